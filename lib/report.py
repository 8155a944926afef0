"""Reports over runs: a Markdown table to paste into experiments.md, learning curves, spectrograms.

    python -m lib.report runs/twotier_* runs/baseline_*         # one row per run, the settings that differ
    python -m lib.report runs/ --time_windows 0-5m,25-30m --plot notes/curves.png
    python -m lib.report experiments/*                          # regenerates the lab notebook's tables
    python -m lib.report RUN --html                             # RUN/index.html, to listen (lib/page.py)
    python -m lib.report RUN1 RUN2 --html compare.html          # the runs' samples side by side, by interval
    python -m lib.report experiments/*cpu_time_dim128* --by_seed   # one row per setting: seeds' mean and spread

Train NLL is averaged over windows of training time (default: the first and the 12th hour) and of
iterations (default: 0-10K and 90K-100K); where the shortest run ends before a default window, the defaults are
the first and the last tenth of that run. The metrics log holds one mean per interval; an interval that
straddles a window's edge counts with the share of its steps (or seconds) inside the window, as if the
interval's steps were alike. A window the run has not reached to its end prints as a dash, never a number.

--by_seed groups runs that differ only by --seed (and by where the same data lay) into one setting: its row gives
the number of seeds and each NLL column's mean and spread (largest minus smallest), and says whether the setting
is separated from the best one by the notebook's rule: the gap between their means is more than twice the larger
of their spreads. A setting of one seed has no spread and is never called separated. The data is shown by its
folder's name and fingerprint, and differs only where the fingerprints do.
"""
import glob
import json
import os

import numpy as np

from lib import UserError, WriteError, page, warn
from lib.cli import ArgumentParser, run_script
from lib.cache import fingerprint_id
from lib.plots import plot_curves
from lib.run import Run, is_run, run_above
from lib.seeds import DASH, METRICS, over_seeds, seed_groups, trained, verdict_text, verdicts
from lib.settings import A_SETTING, SHAPES_CURVES, as_run_did, role
from lib.windows import (DEFAULT_WINDOWS, ITER_UNITS, ROW_KEYS, TIME_UNITS, fitting_windows, is_number, parse_windows,
                         window_mean)


def find_runs(paths):
    """Run folders (holding settings.json) from paths: run folders, parents of run folders, or glob patterns."""
    found, unmatched = [], []
    for path in paths:
        matches = sorted(glob.glob(path))
        if not matches and glob.has_magic(path):  # runs/baseline_* before any baseline run: said, not fatal
            unmatched.append(path)
            continue
        for p in matches or [path]:
            if is_run(p):
                found.append(p)
            elif os.path.isdir(p) and (children := [c for c in sorted(glob.glob(os.path.join(glob.escape(p), "*")))
                                                    if is_run(c)]):
                found += children
            else:
                raise UserError(f"{p} is not a run folder (no settings.json) nor a folder of runs")
    if unmatched and not found:
        raise UserError(f"no run matches {' '.join(unmatched)}: train one first (README: Train)")
    for pattern in unmatched:
        warn(f"{pattern} matches no run (none trained yet?): the report shows the others")
    return list(dict.fromkeys(found))


def summarize(run_dir, time_windows, iter_windows):
    """One run's row as a dict (values, or None where not reached or not measured); None, with one warning, if
    it has no metrics or its folder cannot be read as a run (the other runs are still reported)."""
    run = Run(run_dir)
    try:
        settings = run.record()
        if "parameters" not in settings:
            raise UserError(f"{run.record_path} has no parameter count")
    except UserError as e:
        warn(f"{e}; the run is left out")
        return None
    rows = run.metrics()
    complete = [r for r in rows if all(is_number(r.get(k)) for k in ROW_KEYS)]
    if not complete:
        warn(f"{run_dir} has no metrics rows yet (none complete: it has not finished an interval); it is left out")
        return None
    if len(complete) < len(rows):
        warn(f"{run_dir}: {len(rows) - len(complete)} metrics row(s) without a number for each of "
             f"{', '.join(ROW_KEYS)}; ignored")
        rows = complete
    finite = [r for r in rows if np.isfinite(r["valid_bits"])]
    if not finite:
        warn(f"{run_dir} has no finite valid NLL in its metrics; the run is left out")
        return None
    best = min(finite, key=lambda r: r["valid_bits"])
    test_at_best = rows[-1].get("best_test_bits") if rows[-1].get("best_iteration") == best["iteration"] else None
    if test_at_best is None:
        test_at_best = best.get("test_bits")  # measured there: --test_on_best, or the run's end
    return {"run": os.path.basename(os.path.normpath(run_dir)), "path": run_dir, "model": settings["model_id"],
            "settings": as_run_did(settings["model_id"], settings["settings"]), "parameters": settings["parameters"],
            "data_fingerprint": settings.get("data_fingerprint"),
            "iterations": rows[-1]["iteration"], "hours": rows[-1]["train_secs"] / 3600,
            "time_windows": {label: window_mean(rows, "train_secs", a, b) for label, a, b in time_windows},
            "iter_windows": {label: window_mean(rows, "iteration", a, b) for label, a, b in iter_windows},
            "best_valid": best["valid_bits"], "best_iteration": best["iteration"],
            "best_hours": best["train_secs"] / 3600, "test_at_best": test_at_best, "rows": rows}


def differing(summaries, roles=A_SETTING):
    """The flags whose values differ between the runs (sorted), of the roles asked for (lib/settings.py ROLES).
    Each run's flags are as the run used them (lib.settings.as_run_did: a flag added since it was made has the
    value it ran with), so a flag some runs lack is another model's own, and differs. The data differs where its
    content does (data_keys)."""
    keys = sorted(k for k in set().union(*(s["settings"] for s in summaries)) - {"data"} if role(k) in roles)
    absent = object()
    differ = [k for k in keys if len({json.dumps(s["settings"].get(k, absent), default=str) for s in summaries}) > 1]
    return sorted(differ + (["data"] if len(set(data_keys(summaries))) > 1 else []))


def data_keys(summaries):
    """What tells each run's data apart: its fingerprint (by content, wherever it lay), or, where a run was made
    before runs recorded fingerprints, the folder's name for every run."""
    if any(s.get("data_fingerprint") is None for s in summaries):
        return [os.path.basename(os.path.normpath(s["settings"].get("data", "?"))) for s in summaries]
    return [fingerprint_id(s["data_fingerprint"]) for s in summaries]


def data_ids(summaries):
    """Each run's data in a few characters: its folder's name and a CRC-32 of its fingerprint (by content). Runs
    made before runs recorded fingerprints are told apart by the name alone, and so are the runs beside them.
    Where two fingerprints share a name, the path is shown too."""
    names = [os.path.basename(os.path.normpath(s["settings"].get("data", "?"))) for s in summaries]
    if any(s.get("data_fingerprint") is None for s in summaries):
        return names
    ids = data_keys(summaries)
    shared = {n for n in names if len({i for i, m in zip(ids, names) if m == n}) > 1}
    return [f"{s['settings']['data'] if n in shared else n} ({i})" for s, n, i in zip(summaries, names, ids)]


def setting_values(summaries, key):
    """The cells of one setting's column: the value each run has (data: data_ids), a dash where it has none."""
    if key == "data":
        return data_ids(summaries)
    return [str(s["settings"].get(key, DASH)) for s in summaries]


def test_bits_16(summary):
    """The run's test NLL at best in bits per 16-bit sample (lib.quantize.code_bits averaged over the test split's
    predicted samples, added); None where not measured, or for --norm minmax (it rescales each clip)."""
    from lib import DEFAULT_DATA
    from lib.data import Segments, load_splits  # only this column needs the data
    from lib.quantize import code_bits
    s = summary["settings"]
    if summary["test_at_best"] is None or s.get("norm", "none") != "none":
        return None
    data = s["data"]
    if not os.path.exists(data) and os.path.basename(data) == os.path.basename(DEFAULT_DATA):
        data = DEFAULT_DATA  # the shipped data, recorded by a checkout elsewhere
    try:
        split = load_splits(data, s.get("clip_secs", 8.0))[0]["test"]
    except UserError as e:  # the run's data is not on this machine: no number, and the table still prints
        warn(f"{summary['run']}: no bits per 16-bit sample ({e})")
        return None
    split.set_quantization(s["q_levels"], s["qtype"], s.get("zero_dc", False), s.get("norm", "none"))
    segments = Segments(split, s["seq_len"], "test clips")
    targets = segments.levels(np.arange(len(segments)), 0, segments.length, s["q_levels"])  # what evaluate predicts
    return summary["test_at_best"] + float(code_bits(s["q_levels"], s["qtype"])[targets.numpy()].mean())


def table(summaries):
    """The report's table -> (header, rows of cell strings): one row per run, bits per sample to 3 decimals, a dash
    where not reached. Where the runs differ in quantization, a last column gives test NLL in bits per 16-bit
    sample, comparable across them."""
    keys = differing(summaries)
    per_16bit = bool({"qtype", "q_levels"} & set(keys))
    tw, iw = list(summaries[0]["time_windows"]), list(summaries[0]["iter_windows"])

    def bits(v):
        return DASH if v is None else f"{v:.3f}"
    head = (["run", "model"] + [f"--{k}" for k in keys] + ["params", "iters", "hours"] +
            [f"train {w} (time)" for w in tw] + [f"train {w} (iters)" for w in iw] +
            ["best valid", "at iter (hour)", "test at best"] + (["test, bits per 16-bit sample"] if per_16bit else []))
    cells = [setting_values(summaries, k) for k in keys]
    rows = [[f"`{s['run']}`", s["model"]] + [column[i] for column in cells] +
            [f"{s['parameters']:,}", f"{s['iterations']:,}", f"{s['hours']:.3f}"] +
            [bits(s["time_windows"][w]) for w in tw] + [bits(s["iter_windows"][w]) for w in iw] +
            [bits(s["best_valid"]), f"{s['best_iteration']:,} ({s['best_hours']:.3f})", bits(s["test_at_best"])] +
            ([bits(test_bits_16(s))] if per_16bit else []) for i, s in enumerate(summaries)]
    return head, rows


def markdown_table(summaries):
    """The report as Markdown (table())."""
    head, rows = table(summaries)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(cells) + " |" for cells in rows])


def short_names(summaries):
    """Legend labels: the model and the flags that differ and shape the curves (the model, the data, how it trains),
    wrapped (or the run name when that is ambiguous)."""
    import textwrap
    keys = differing(summaries, SHAPES_CURVES)
    cells = {k: setting_values(summaries, k) for k in keys}
    names = ["\n".join(textwrap.wrap(" ".join([s["model"]] + [f"{k}={cells[k][i]}" for k in keys
                                                               if cells[k][i] != DASH]), 34))
             for i, s in enumerate(summaries)]
    return names if len(set(names)) == len(names) else [s["run"] for s in summaries]


# ---- settings over seeds (--by_seed)

def setting_of(summary, data_key):
    """What a run is apart from its seed: its model, the flags that make a setting, its data by content."""
    flags = {k: v for k, v in summary["settings"].items() if role(k) in A_SETTING and k not in ("seed", "data")}
    return summary["model"], json.dumps(flags, sort_keys=True, default=str), data_key


def seed_report(summaries, metric, as_json):
    """One row per setting (seed_groups): its seeds, what they trained, each NLL column's mean (spread), and the
    verdict against the best setting on `metric` -> Markdown, or JSON lines."""
    groups = seed_groups(summaries, [setting_of(s, d) for s, d in zip(summaries, data_keys(summaries))])
    firsts = [g[0] for g in groups]
    keys = [k for k in differing(firsts) if k != "seed"] if len(groups) > 1 else []
    cells = {k: setting_values(firsts, k) for k in keys}
    stats = [over_seeds(g) for g in groups]
    judged = verdicts(stats, METRICS[metric])
    if as_json:
        return "\n".join(json.dumps({
            "model": g[0]["model"], "runs": [s["run"] for s in g], "seeds": [s["settings"].get("seed") for s in g],
            "settings": {k: cells[k][i] for k in keys}, "iterations": [s["iterations"] for s in g],
            "hours": [s["hours"] for s in g], "trained": trained(g), "columns": stats[i], "metric": metric,
            "gap_to_best": judged[i][0], "separated": judged[i][1]}) for i, g in enumerate(groups))
    names = list(stats[0])
    head = ["setting", "model"] + [f"--{k}" for k in keys] + ["seeds", "trained"] + \
        [f"{n}: mean (spread)" for n in names] + \
        [f"{METRICS[metric]} against the best"]

    def cell(st):
        return DASH if st["mean"] is None else f"{st['mean']:.3f}" + \
            (f" ({st['spread']:.3f})" if st["spread"] is not None else "")
    rows = [[f"`{g[0]['run']}`" + (f" + {len(g) - 1}" if len(g) > 1 else ""), g[0]["model"]] +
            [cells[k][i] for k in keys] + [", ".join(str(s["settings"].get("seed")) for s in g), trained(g)] +
            [cell(stats[i][n]) for n in names] + [verdict_text(*judged[i], len(g) == 1)] for i, g in enumerate(groups)]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                      ["| " + " | ".join(r) + " |" for r in rows])


PLOT_TYPES = (".png", ".pdf", ".svg")


def check_plot(path, overwrite):
    """A UserError when --plot would replace a folder, or a file that matplotlib did not draw."""
    if os.path.isdir(path):
        raise UserError(f"--plot {path} is a folder: name a file, e.g. {os.path.join(path, 'curves.png')}")
    if os.path.splitext(path)[1].lower() not in PLOT_TYPES:
        raise UserError(f"--plot {path}: name a {', '.join(PLOT_TYPES)} file (matplotlib picks the format by it)")
    inside = run_above(path)
    if inside:  # a run's own curves.png, or any file in a run: the run's to write
        raise UserError(f"--plot {path} is inside the run {inside}, whose files are the run's own: choose a path "
                        f"outside run folders")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there to replace
    except OSError:
        head = b""
    if not overwrite and b"matplotlib" not in head.lower():
        raise UserError(f"--plot {path} exists and is not a plot this command drew: choose another name, or pass "
                        f"--overwrite to replace it")


def report(paths, time_windows=None, iter_windows=None, plot=None, as_json=False, html=None, overwrite=False,
           by_seed=None):
    """The text to print for these runs (Markdown, or JSON lines). Windows not given: fitting_windows.
    html: "" writes each run's RUN/index.html (lib/page.py); a path writes the page comparing the runs there.
    by_seed: a metric (METRICS): one row per setting over its seeds (seed_report)."""
    if by_seed and html is not None:
        raise UserError("--by_seed prints a table of settings; --html pages are per run: give one of them")
    runs = find_runs(paths)
    fitting = fitting_windows(runs) if time_windows is None or iter_windows is None else DEFAULT_WINDOWS
    time_windows, iter_windows = time_windows or fitting[0], iter_windows or fitting[1]
    tw, iw = parse_windows(time_windows, TIME_UNITS), parse_windows(iter_windows, ITER_UNITS)
    if html == "":  # the run pages render whatever each folder holds, metrics or not
        return "\n".join(f"wrote {page.write_run_page(Run(r))}" for r in runs)
    summaries = [s for s in (summarize(r, tw, iw) for r in runs) if s is not None]
    if not summaries:
        raise UserError("none of the runs has metrics yet")
    if html:  # every output checked before anything is written
        page.check_output(html, "compare", overwrite, "--html")
        files = page.files_folder(html)
        if os.path.exists(files) and not overwrite and not (os.path.exists(html) and page.is_page(html, "compare")):
            raise UserError(f"{files} exists and is not the files folder of a page this command wrote ({html}): "
                            f"choose another --html name, or pass --overwrite")
        if run_above(html) or run_above(os.path.join(files, "x")):
            raise UserError(f"--html {html} is inside the run {run_above(html) or run_above(files)}, whose files are "
                            f"the run's own: choose a path outside run folders")
        plot = plot or os.path.join(page.files_folder(html), "curves.png")
    if plot:
        check_plot(plot, overwrite)
    if html:
        try:
            os.makedirs(page.files_folder(html), exist_ok=True)
        except OSError as e:
            raise WriteError(page.files_folder(html), e) from None
    if plot:
        plot_curves({name: s["rows"] for name, s in zip(short_names(summaries), summaries)}, plot)
    if by_seed:
        return seed_report(summaries, by_seed, as_json)
    if as_json:
        return "\n".join(json.dumps({k: v for k, v in s.items() if k not in ("rows", "path")}) for s in summaries)
    if html:
        head, rows = table(summaries)
        page.write_compare_page(summaries, head, rows, html, plot)
        return markdown_table(summaries) + f"\nwrote {html}"
    return markdown_table(summaries)


def build_parser():
    p = ArgumentParser(prog="python -m lib.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders, folders of runs, or glob patterns")
    p.add_argument("--time_windows", default=None,
                   help="windows of training time for the mean train NLL (units h, m, s; no unit = hours) (default: "
                        "0-1h,11-12h, or the first and last tenth of the shortest run if it is shorter)")
    p.add_argument("--iter_windows", default=None,
                   help="windows of iterations for the mean train NLL (units K, M) (default: 0-10K,90K-100K, or "
                        "the first and last tenth of the shortest run if it is shorter)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write the learning curves of all runs here")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    p.add_argument("--by_seed", nargs="?", const="test_at_best", default=None, choices=sorted(METRICS),
                   metavar="METRIC", help="one row per setting (runs that differ only by --seed): each NLL column's "
                   "mean and spread over the seeds, and whether the setting is separated from the best on METRIC "
                   "(test_at_best, the default, or best_valid): a gap of more than twice the larger spread")
    p.add_argument("--html", nargs="?", const="", default=None, metavar="OUT.html",
                   help="alone: write (or rewrite) each run's RUN/index.html, the page to listen to its samples; with "
                        "a file name: one page comparing the runs, their samples side by side by interval")
    p.add_argument("--overwrite", action="store_true",
                   help="let --html and --plot replace a file that is not a page or plot this command wrote")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    print(run_script(report, args.runs, args.time_windows, args.iter_windows, args.plot, args.json, args.html,
                     args.overwrite, args.by_seed))


if __name__ == "__main__":
    main()
