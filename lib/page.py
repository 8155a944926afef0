"""Pages to listen with: RUN/index.html for one run, a folder page for generate.py's output, and one page that
compares runs. Each sample has an audio player and a small spectrogram PNG (made once, beside its WAV).

The pages are plain HTML and CSS with relative links only: no script, no server, nothing from the network. They
open from the folder itself (file://), and a run folder copied or archived whole keeps its page working.
Whatever is missing (no samples yet, a deleted WAV or PNG, a half-written metrics line, a run still training)
is left out of the page with one warning line, never a traceback.

    python -m lib.report RUN --html                  # RUN/index.html (older runs: their spectrograms are made)
    python -m lib.report RUN1 RUN2 --html OUT.html   # the comparison page; its curves go to OUT_files/
"""
import glob
import html
import os
import re
from urllib.parse import quote

import numpy as np

from lib import UserError, WriteError, warn
from lib.audio import BadAudio, find_audio, read_mono, write_wav
from lib.run import Run, atomic_write

SPECTROGRAM_COLUMNS = 400  # at most this many time steps per image: a long sample gets a coarser hop
SPECTROGRAM_ROWS = 128  # frequency bins shown, 0 Hz to Nyquist
FLOOR_DB, CEILING_DB = -90.0, -10.0  # the colour scale, dB below a full-scale sine; one scale for every image
COLOURS = 16  # steps of 5 dB: a 4-bit PNG, about a quarter of a 2-second 8 kHz WAV's size (notes/performance.md)
SAMPLE_NAME = re.compile(r"it(\d+)_(\d+)\.wav$")


# ---- spectrograms

def spectrogram(audio, rate):
    """(SPECTROGRAM_ROWS, time steps) magnitudes in dB of float audio, low frequencies in the last row (as drawn).
    Hann window of about 32 ms (a power of two), hop a quarter of it or coarser for long audio."""
    n_fft = 2 * SPECTROGRAM_ROWS * max(1, 2 ** round(np.log2(rate * 0.032 / (2 * SPECTROGRAM_ROWS))))
    hop = max(n_fft // 4, -(-len(audio) // SPECTROGRAM_COLUMNS))
    padded = np.concatenate([np.zeros(n_fft // 2, np.float32), audio, np.zeros(n_fft // 2, np.float32)])
    starts = np.arange(0, max(1, len(padded) - n_fft + 1), hop)
    frames = np.stack([padded[s:s + n_fft] for s in starts]) if len(padded) >= n_fft else \
        np.zeros((1, n_fft), np.float32)
    window = np.hanning(n_fft).astype(np.float32)
    magnitude = np.abs(np.fft.rfft(frames * window, axis=1))[:, :n_fft // 2]  # the Nyquist bin dropped
    magnitude = magnitude.reshape(len(frames), SPECTROGRAM_ROWS, -1).mean(axis=2)  # bins grouped to the rows
    with np.errstate(divide="ignore"):  # digital silence is -inf dB: drawn as the floor
        db = 20 * np.log10(magnitude * 2 / window.sum())  # a full-scale sine at 0 dB
    return db.T[::-1]


def write_spectrogram(wav, png):
    """A small PNG of `wav`'s spectrogram: one pixel per time step and row, COLOURS colours (magma) on one fixed dB
    scale, so that images compare by eye. BadAudio if the WAV cannot be read; WriteError if the PNG cannot be
    written."""
    from matplotlib import colormaps
    from PIL import Image
    audio, rate = read_mono(wav)
    db = spectrogram(audio, rate)
    levels = np.clip((db - FLOOR_DB) / (CEILING_DB - FLOOR_DB), 0, 1)
    index = np.nan_to_num(np.round(levels * (COLOURS - 1)), nan=0).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    palette = (colormaps["magma"](np.arange(COLOURS) / (COLOURS - 1))[:, :3] * 255).astype(np.uint8)
    image.putpalette(palette.reshape(-1).tolist())
    atomic_write(png, lambda tmp: image.save(tmp, format="PNG", optimize=True, bits=4))


def spectrogram_path(wav):
    return os.path.splitext(wav)[0] + ".png"


def make_spectrograms(wavs, quiet=False):
    """The PNG beside each WAV that lacks one (or has an older one) -> the WAVs that have one now. A WAV that
    cannot be read or a PNG that cannot be written is one warning (unless quiet) and no image."""
    done = []
    for wav in wavs:
        png = spectrogram_path(wav)
        try:
            if not os.path.exists(png) or os.path.getmtime(png) < os.path.getmtime(wav):
                write_spectrogram(wav, png)
            done.append(wav)
        except (BadAudio, WriteError, OSError) as e:
            if not quiet:
                warn(f"no spectrogram for {wav} ({e})")
    return done


# ---- pieces of HTML

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 110em; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.best { background: #fff4c2; }
.meta { color: #555; } code { background: #f3f3f3; padding: 0 3px; }
figure { display: inline-block; margin: 4px 12px 8px 0; vertical-align: top; }
figure img { display: block; width: 400px; height: 128px; image-rendering: pixelated; border: 1px solid #ccc; }
figure audio { display: block; width: 400px; } figcaption { font-size: 12px; color: #555; }
.interval { border-top: 1px solid #ddd; padding-top: 0.4em; } .missing { color: #a33; font-size: 12px; }
img.curves { max-width: 100%; }
"""


def esc(text):
    return html.escape(str(text))


def link(path, page_dir):
    """A relative URL from the page's folder to `path` (each part percent-encoded)."""
    return quote(os.path.relpath(path, page_dir).replace(os.sep, "/"))


# each page says which writer made it: a writer replaces only its own kind of page, never another file
KINDS = {"run": "samplernn run page", "folder": "samplernn generate.py page", "compare": "samplernn lib.report page"}
BEFORE_KINDS = {"folder": " generated files.</p>", "compare": " runs compared</h1>"}  # pages made before KINDS


def document(title, body, kind):
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="generator" content="{KINDS[kind]}">\n<title>{esc(title)}</title>\n'
            f'<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n')


def is_page(path, kind):
    """Whether the file at `path` is a page of this kind that this repository wrote."""
    try:
        with open(path, errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    return f'content="{KINDS[kind]}"' in text[:500] or (kind in BEFORE_KINDS and text.startswith("<!DOCTYPE html>")
                                                         and BEFORE_KINDS[kind] in text)


def check_output(path, kind, overwrite=False, flag="the output"):
    """A UserError, before anything is written, when writing a page of `kind` at `path` would replace something
    else: a folder, or a file that is not such a page (unless overwrite)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: name a file, e.g. {os.path.join(path, 'compare.html')}")
    if os.path.lexists(path) and not overwrite and not is_page(path, kind):
        raise UserError(f"{flag} {path} exists and is not a page this command wrote: choose another name, or pass "
                        f"--overwrite to replace it")


def html_table(head, rows, classes=None):
    """rows of cell strings (already HTML); classes: one CSS class per row (or None)."""
    classes = classes or [""] * len(rows)
    cells = lambda row: "".join(f'<td class="num">{c}</td>' if re.fullmatch(r"[\d.,()\s\u2014*-]+", c) else  # noqa: E731
                                f"<td>{c}</td>" for c in row)
    return ("<table>\n<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>\n" +
            "".join(f'<tr class="{c}">{cells(r)}</tr>\n' for r, c in zip(rows, classes)) + "</table>")


def player(wav, page_dir, caption):
    """An audio player and the spectrogram beside it (when there is one), captioned."""
    png = spectrogram_path(wav)
    image = f'<img src="{link(png, page_dir)}" alt="spectrogram of {esc(os.path.basename(wav))}">' \
        if os.path.exists(png) else '<span class="missing">no spectrogram</span>'
    return (f'<figure><audio controls preload="metadata" src="{link(wav, page_dir)}"></audio>{image}'
            f'<figcaption>{esc(caption)}</figcaption></figure>')


def write_page(path, title, body, kind):
    text = document(title, body, kind)
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


# ---- one run

def run_samples(run):
    """{iteration: [WAV paths, by sample number]} of the samples the run holds now."""
    found = {}
    for wav in run.all_samples():
        m = SAMPLE_NAME.search(os.path.basename(wav))
        if m:
            found.setdefault(int(m.group(1)), []).append((int(m.group(2)), wav))
    return {it: [w for _, w in sorted(v)] for it, v in found.items()}


def complete_rows(run, quiet):
    numbers = ("iteration", "train_secs", "train_bits", "valid_bits")
    return [r for r in run.metrics(quiet=quiet)
            if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in numbers)]


def missing_samples(run, rows, samples, n_samples):
    """One line per sample an interval should have and does not (n_samples per metrics row)."""
    lines = []
    for r in rows:
        have = {SAMPLE_NAME.search(os.path.basename(w)).group(2) for w in samples.get(r["iteration"], [])}
        for k in range(n_samples):
            if str(k) not in have:
                lines.append(f"{run}: iteration {r['iteration']} has no samples/it{r['iteration']:07d}_{k}.wav")
    return lines


def write_run_page(run, quiet=False):
    """RUN/index.html (run: a lib.run.Run) from what the run folder holds now; missing spectrograms are made first. Each missing piece
    is one warning line (unless quiet: the training loop, which writes the page at each interval's end)."""
    say = (lambda m: None) if quiet else warn
    saved = run.record_or_none() or {}
    flags = saved.get("settings", {})
    rows = complete_rows(run, quiet)
    samples = run_samples(run)
    for line in missing_samples(run, rows, samples, flags.get("n_samples", 0)):
        say(line)
    make_spectrograms([w for ws in samples.values() for w in ws], quiet)  # one warning per WAV it cannot draw
    name = os.path.basename(os.path.normpath(run.folder))
    best = min((r for r in rows if np.isfinite(r["valid_bits"])), key=lambda r: r["valid_bits"], default=None)
    parts = [f"<h1>{esc(name)}</h1>"]
    if saved:
        parts.append(f'<p class="meta">{esc(saved.get("model_id", "?"))}, {number(saved.get("parameters"), ",")} parameters, '
                     f'{esc(saved.get("device", "?"))}, {esc(saved.get("sample_rate", "?"))} Hz; started with '
                     f'<code>{esc(saved.get("command", ""))}</code></p>')
        parts.append("<details><summary>all flags</summary>" + html_table(
            ["flag", "value"], [[f"--{esc(k)}", esc(v)] for k, v in sorted(flags.items())]) + "</details>")
    else:
        say(f"{run.record_path} is missing or not a run's settings; the page shows the metrics and samples only")
    parts.append(metrics_section(rows, best, samples))
    if os.path.exists(run.curves):
        parts.append(f'<h2>Learning curves</h2><img class="curves" src="{os.path.basename(run.curves)}" '
                     f'alt="learning curves">')
    elif rows:
        say(f"{run} has no curves.png")
    parts.append(samples_section(run.folder, rows, best, samples))
    write_page(run.page, name, "\n".join(parts), "run")
    return run.page


def number(v, spec):
    return f"{v:{spec}}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "\u2014"


def bits(v):
    return number(v, ".3f")


def metrics_section(rows, best, samples):
    if not rows:
        return "<h2>Metrics</h2><p>No interval has ended yet.</p>"
    head = ["interval", "iteration", "hours", "epochs", "train NLL", "valid NLL", "test NLL", "samples"]
    body = [[str(n), f"{r['iteration']:,}", f"{r['train_secs'] / 3600:.3f}", number(r.get("epochs"), ".2f"),
             bits(r["train_bits"]), bits(r["valid_bits"]) + (" *" if r is best else ""), bits(r.get("test_bits")),
             str(len(samples.get(r["iteration"], [])))] for n, r in enumerate(rows, 1)]
    note = "<p>NLL in bits per sample; * marks the best valid NLL (checkpoints/best.pt).</p>"
    return "<h2>Metrics</h2>" + note + html_table(head, body, ["best" if r is best else "" for r in rows])


def samples_section(folder, rows, best, samples):
    """One block per interval, newest first, its samples as players; samples without a metrics row (a run still
    writing one) come with their iteration only."""
    by_iteration = {r["iteration"]: (n, r) for n, r in enumerate(rows, 1)}
    iterations = sorted(set(samples) | set(by_iteration), reverse=True)
    if not samples:
        return "<h2>Samples</h2><p>No samples yet (they are written at each interval's end; --n_samples 0 writes none).</p>"
    blocks = ["<h2>Samples, newest first</h2><p>Every interval's samples are drawn with the same noise: they differ "
              "by the weights only.</p>"]
    for it in iterations:
        n, r = by_iteration.get(it, (None, None))
        title = f"iteration {it:,}" + (f", interval {n}, {r['train_secs'] / 3600:.3f} h, valid {r['valid_bits']:.3f}"
                                       + (" (best)" if r is best else "") if r else "")
        players = "".join(player(w, folder, os.path.basename(w)) for w in samples.get(it, [])) or \
            '<span class="missing">no samples</span>'
        blocks.append(f'<div class="interval"><h3>{esc(title)}</h3>{players}</div>')
    return "\n".join(blocks)


# ---- generate.py's output folder

def write_folder_page(folder, title):
    """folder/index.html: every WAV in the folder (what generate.py wrote, over all its calls) with its
    spectrogram, and the softmax pictures beside them."""
    wavs = sorted(glob.glob(os.path.join(glob.escape(folder), "*.wav")))
    make_spectrograms(wavs)
    pictures = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*_softmax.png")))
    parts = [f"<h1>{esc(title)}</h1>", f"<p>{len(wavs)} generated files.</p>"]
    parts += [player(w, folder, os.path.basename(w)) for w in wavs]
    parts += [f'<h2>{esc(os.path.basename(p))}</h2><img class="curves" src="{link(p, folder)}" alt="softmax">'
              for p in pictures]
    write_page(os.path.join(folder, "index.html"), title, "\n".join(parts), "folder")
    return os.path.join(folder, "index.html")


# ---- several runs

def reference_clip(flags, out_wav):
    """The first seconds of the first valid clip of the runs' data, as a WAV -> its path, or None with a warning
    when the data is not on this machine."""
    from lib import DEFAULT_DATA
    data = flags.get("data", DEFAULT_DATA)
    if not os.path.exists(data) and os.path.basename(data) == os.path.basename(DEFAULT_DATA):
        data = DEFAULT_DATA  # the shipped data, recorded by a checkout elsewhere
    if os.path.isfile(data):
        source = data
    else:
        found, _ = find_audio(os.path.join(data, "valid")) if os.path.isdir(os.path.join(data, "valid")) else ([], [])
        if not found:
            warn(f"no reference clip: the runs' data {data} has no valid/ audio on this machine")
            return None
        source = found[0]
    try:
        audio, rate = read_mono(source)
    except BadAudio as e:
        warn(f"no reference clip ({e})")
        return None
    write_wav(out_wav, audio[:int(flags.get("sample_secs", 2.0) * rate)], rate)
    return out_wav


def files_folder(out_path):
    """OUT_files/, beside OUT.html: the comparison page's curves and reference clip."""
    return os.path.splitext(os.path.abspath(out_path))[0] + "_files"


def write_compare_page(summaries, table_head, table_rows, out_path, curves):
    """OUT.html: the report's table and curves (`curves`, a PNG already written), a real clip of the data, then
    the runs' samples side by side by interval (the k-th interval of each run), each with its valid NLL."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    files = files_folder(out_path)
    parts = [f"<h1>{len(summaries)} runs compared</h1>",
             "<p>NLL in bits per sample; train NLL as mean over the windows named, valid at each interval's end.</p>",
             html_table(table_head, [[esc(c).strip("`") for c in row] for row in table_rows]),
             f'<h2>Learning curves</h2><img class="curves" src="{link(curves, out_dir)}" alt="learning curves">']
    reference = reference_clip(summaries[0]["settings"], os.path.join(files, "reference.wav"))
    if reference:
        make_spectrograms([reference])
        parts.append("<h2>The data</h2>" + player(reference, out_dir, "a real clip (the first of the valid split)"))
    runs = []
    for s in summaries:
        run = Run(s["path"])
        samples = run_samples(run)
        for line in missing_samples(run, s["rows"], samples, s["settings"].get("n_samples", 0)):
            warn(line)
        make_spectrograms([w for ws in samples.values() for w in ws])
        runs.append((s, samples))
    n_intervals = max(len(s["rows"]) for s in summaries)
    parts.append("<h2>Samples by interval, side by side</h2><p>Each run draws every interval's samples from the "
                 "same noise (its --seed): where the seeds agree, samples differ by the weights only.</p>")
    head = "".join(f"<th>{esc(s['run'])}</th>" for s in summaries)
    rows = []
    for k in range(n_intervals, 0, -1):  # newest first
        cells = []
        for s, samples in runs:
            if k > len(s["rows"]):
                cells.append("<td></td>")
                continue
            r = s["rows"][k - 1]
            wavs = samples.get(r["iteration"], [])
            best = " (best)" if r["iteration"] == s["best_iteration"] else ""
            cells.append(f"<td>iteration {r['iteration']:,}, {r['train_secs'] / 3600:.3f} h, valid "
                         f"{r['valid_bits']:.3f}{best}<br>" +
                         ("".join(player(w, out_dir, os.path.basename(w)) for w in wavs) or
                          '<span class="missing">no samples</span>') + "</td>")
        rows.append(f"<tr><th>interval {k}</th>{''.join(cells)}</tr>")
    parts.append(f"<table>\n<tr><th></th>{head}</tr>\n" + "\n".join(rows) + "\n</table>")
    write_page(out_path, f"{len(summaries)} runs compared", "\n".join(parts), "compare")
    return out_path
