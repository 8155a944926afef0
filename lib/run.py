"""A run folder on disk: runs/{model}_{tag}_{unixtime}/, written by the training loop, read by generate.py and
the report. Nothing here calls a model.

  settings.json   every flag, derived values, parameter count, versions, git revision, command line, data fingerprint
  log.txt         what was printed
  metrics.jsonl   one JSON object per interval (iteration, seconds, bits per sample, grad norm, samples/s)
  checkpoints/    it0000300.pt ...: everything needed to continue exactly (written atomically); best.pt
  samples/        it0000300_0.wav ...: generated at every interval, from a fixed sampling seed
  curves.png      train and valid NLL by training time and by iteration
"""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import torch
from tqdm import tqdm

from lib import UserError, WriteError, atomic_write, cache
from lib.audio import warn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# settings a session may change when it resumes a run; every other one belongs to the run
RESUMABLE = {"resume", "stop_time", "stop_iters", "print_time", "print_iters", "device", "threads", "cuda_graph_step",
             "valid_clips", "n_samples", "sample_secs", "patience", "dry_run", "data", "keep_checkpoints",
             "accept_changed_data"}  # --data: when the data there is the run's own (its fingerprint)
RENAMED = {"cuda_graph": "cuda_graph_step"}  # flags renamed since older runs were made: old name -> new
DROPPED = {"test_on_best"}  # flags older runs may have saved that no longer exist


def new_run_dir(runs_dir, prefix):
    """runs_dir/{prefix}_{unixtime}, never an existing folder."""
    stamp = int(time.time())
    while True:
        path = os.path.join(runs_dir, f"{prefix}_{stamp}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            stamp += 1
        except OSError as e:
            raise UserError(f"cannot create a run folder under --runs_dir {runs_dir}: {e.strerror}; "
                            f"give a writable folder") from None


def git_info():
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def read_run_settings(run_dir):
    try:
        with open(os.path.join(run_dir, "settings.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{run_dir} is not a run folder (no readable settings.json): pass a folder under runs/") \
            from None


def upgraded(settings):
    """A run's saved flags under today's names: renamed flags take their new name, dropped ones go."""
    settings = {RENAMED.get(k, k): v for k, v in settings.items()}
    return {k: v for k, v in settings.items() if k not in DROPPED}


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_settings(run_dir, settings):
    write_text(os.path.join(run_dir, "settings.json"), json.dumps(settings, indent=1))


def hold_run(run_dir):
    """An exclusive lock on RUN/.lock while this process trains the run (released by release_runs, or by the
    kernel when the process ends, however): a second process on the same run is refused with one line naming
    the first."""
    fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{run_dir} is being trained by process {pid} now: let it finish, or stop it (Ctrl-C "
                        f"saves) and resume then") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held.append(fd)  # open until the run ends here


_held = []


def release_runs():
    while _held:
        os.close(_held.pop())


def check_data(run_dir, splits, data, accept_changed):
    """On resume: the data must be what the run trained on (by content, wherever it lies now), unless
    accept_changed (--accept_changed_data); then the run's fingerprint becomes the new data's, and the change
    is logged in settings.json."""
    run = read_run_settings(run_dir)
    old, new = run.get("data_fingerprint"), cache.fingerprint(splits)
    if old is None:
        warn(f"{run_dir} was made before runs recorded their data's fingerprint: the data is not checked")
        return
    change = cache.describe_change(old, new)
    if not change:
        return
    if not accept_changed:
        raise UserError(f"the data in {data} differs from what {run_dir} was trained on ({change}): "
                        f"resume with its own data, or add --accept_changed_data to train on this")
    warn(f"training on changed data ({change}), as --accept_changed_data asks")
    run["data_fingerprint"] = new
    run.setdefault("data_changes", []).append(change)
    write_settings(run_dir, run)


def new_run_id():
    """The id a run gets at creation, written into settings.json and every checkpoint it saves: a checkpoint copied
    in from another run, even one with the same flags, is never taken for the run's own."""
    return uuid.uuid4().hex


def checkpoint_paths(run_dir):
    """The run folder's interval checkpoints it0000300.pt ..., oldest first (names are zero-padded iteration
    numbers). What they hold is not checked here: own_checkpoints and read_checkpoint check it."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in sorted(names) if re.fullmatch(r"it\d+\.pt", n)]


def checkpoint_path(run_dir, iteration):
    return os.path.join(run_dir, "checkpoints", f"it{iteration:07d}.pt")


def best_path(run_dir):
    return os.path.join(run_dir, "checkpoints", "best.pt")


def load_checkpoint(path, mmap=False):
    """A checkpoint's dict, on the CPU (mmap: tensors mapped, not read: to look at its state cheaply). Checkpoints
    hold plain Python state beside tensors (settings, the metrics row), so they are not loaded weights-only: load
    only checkpoints you trust, as with any pickle."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def read_checkpoint(run, path, mmap=False):
    """(checkpoint, '') when the file at `path` loads and is the run's own (`run`: its settings.json, or None when
    there is none to compare with), else (None, why not)."""
    try:
        ckpt = load_checkpoint(path, mmap)
        if not isinstance(ckpt, dict) or not {"model_id", "settings", "model", "state"} <= set(ckpt):
            raise ValueError("not a checkpoint of this repository")
    except Exception as e:  # torch raises many types for damaged files
        return None, f"unreadable ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
    foreign = not_of_run(run, ckpt, os.path.basename(path)) if run is not None else ""
    return (None, f"not this run's ({foreign})") if foreign else (ckpt, "")


def not_of_run(run, ckpt, name):
    """'' if the checkpoint file `name` was saved by the run whose settings.json is `run`, else how it differs:
    another run's id (runs made before ids: another model or other flags), or an iteration other than its name's."""
    if ckpt["model_id"] != run.get("model_id"):
        return f"a {ckpt['model_id']} checkpoint in a {run.get('model_id')} run"
    if ckpt.get("run_id") != run.get("run_id"):
        return f"saved by run {ckpt.get('run_id') or '(made before run ids)'}, this run is {run.get('run_id')}"
    named = re.fullmatch(r"it(\d+)\.pt", name)
    held = ckpt["state"].get("iteration") if isinstance(ckpt["state"], dict) else None
    if named and held != int(named.group(1)):
        return f"it holds iteration {held}, not {int(named.group(1))}"
    theirs, ours = upgraded(ckpt["settings"]), upgraded(run.get("settings", {}))
    differ = sorted(k for k in theirs.keys() & ours.keys() if k not in RESUMABLE and theirs[k] != ours[k])
    return f"--{differ[0]} {theirs[differ[0]]!r}, the run has {ours[differ[0]]!r}" if differ else ""


def run_or_none(run_dir):
    try:
        return read_run_settings(run_dir)
    except UserError:
        return None  # nothing to compare with


def load_latest_checkpoint(run_dir, verb):
    """(path, checkpoint) of the run's newest own checkpoint that loads, newest first, best.pt among them by the
    iteration it holds: a damaged one (truncated, empty) or another run's is skipped with a warning. None if the
    run has no such checkpoint."""
    run = run_or_none(run_dir)
    paths = checkpoint_paths(run_dir)[::-1]
    best, _ = read_checkpoint(run, best_path(run_dir), mmap=True) if os.path.exists(best_path(run_dir)) \
        else (None, "")
    if best is not None:  # a copy of an interval checkpoint, which may be gone or damaged
        at = next((i for i, p in enumerate(paths) if int(os.path.basename(p)[2:-3]) < best["state"]["iteration"]),
                  len(paths))
        paths.insert(at, best_path(run_dir))
    for i, path in enumerate(paths):
        then = f"{verb} {os.path.basename(paths[i + 1])}" if i + 1 < len(paths) else "no older checkpoint"
        ckpt, problem = read_checkpoint(run, path)
        if problem:
            warn(f"{os.path.basename(path)} is {problem}; {'' if problem.startswith('unreadable') else 'skipped: '}{then}")
            continue
        return path, ckpt
    return None


def own_checkpoint(run_dir, path):
    """The checkpoint at `path`, checked to be the run's own and to load; a one-line UserError if not."""
    ckpt, problem = read_checkpoint(run_or_none(run_dir), path)
    if problem:
        raise UserError(f"{path} is {problem}")
    return ckpt


def saved_state(run, path):
    """The training state ({'iteration': ...}) in the run's own checkpoint at `path`; {} if it is damaged or not
    the run's (treated as missing)."""
    ckpt, _ = read_checkpoint(run, path, mmap=True) if os.path.exists(path) else (None, "")
    return ckpt["state"] if ckpt is not None else {}


def save_checkpoint(run_dir, ckpt):
    """Written to a temporary file and renamed (lib.atomic_write: a kill or a full disk never leaves a partial
    one) -> its path."""
    path = checkpoint_path(run_dir, ckpt["state"]["iteration"])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise WriteError(os.path.dirname(path), e) from None

    def write(tmp):
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as e:  # torch's writer reports a short write as "[enforce fail ...] unexpected pos"
            free = shutil.disk_usage(os.path.dirname(path)).free
            raise WriteError(path, OSError(f"the write stopped partway ({free / 2 ** 20:,.0f} MB free there: a full "
                                           f"disk, a quota or a file size limit?)")) from e
    atomic_write(path, write)
    return path


def write_best(run_dir, checkpoint):
    """checkpoints/best.pt: a copy of the checkpoint with the best valid NLL so far, written atomically."""
    atomic_write(best_path(run_dir), lambda tmp: shutil.copyfile(checkpoint, tmp))


def keep_newest(run_dir, keep):
    """Only the run's newest `keep` interval checkpoints stay; files of other runs (or damaged ones) are not
    counted and never removed (best.pt is a copy: what it came from may go)."""
    run = run_or_none(run_dir)
    own = [p for p in checkpoint_paths(run_dir) if read_checkpoint(run, p, mmap=True)[0] is not None]
    for old in own[:-keep]:
        os.remove(old)


def metrics_lines(run_dir):
    """(rows, others) of RUN/metrics.jsonl: rows are JSON objects with an integer iteration; others are
    (line number, text, why) for every other line: half-written by a kill or a full disk, or not a metrics row."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows, others = [], []
    if not os.path.exists(path):
        return rows, others
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                others.append((n, line, "is not a complete row (a write was cut off)"))
                continue
            it = row.get("iteration") if isinstance(row, dict) else None
            if isinstance(it, int) and not isinstance(it, bool):
                rows.append(row)
            else:
                others.append((n, line, "is not a metrics row (no integer iteration)"))
    return rows, others


def read_metrics(run_dir, quiet=False):
    """The rows of RUN/metrics.jsonl. A line that is not a metrics row is dropped with a warning (unless quiet)."""
    rows, others = metrics_lines(run_dir)
    for n, _, why in others if not quiet else ():
        warn(f"{os.path.join(run_dir, 'metrics.jsonl')} line {n} {why}; it is ignored")
    return rows


def append_metrics(run_dir, row):
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise WriteError(path, e) from None


def sample_paths(run_dir, iteration, n_samples):
    return [os.path.join(run_dir, "samples", f"it{iteration:07d}_{k}.wav") for k in range(n_samples)]


def remove_temporary_files(run_dir):
    """Temporary files (*.tmp*) that a kill left in the run folder: partial checkpoints, samples, metrics."""
    for root, _, files in os.walk(run_dir):
        for name in files:
            if ".tmp" in name:
                os.remove(os.path.join(root, name))


SET_ASIDE = "metrics_set_aside.jsonl"  # rows a resume will redo, and lines that are no metrics rows: kept, not lost


def repair(run_dir, iteration, row, source):
    """On resume from the checkpoint `source` of `iteration`: metrics rows logged after it (and lines that are no
    metrics rows) move to RUN/metrics_set_aside.jsonl, each with why; if the checkpoint ends an interval (it holds
    the interval's row), put back that row and best.pt where a kill came before they were written."""
    rows, others = metrics_lines(run_dir)
    keep = [r for r in rows if r["iteration"] <= iteration]
    why = f"set aside on {time.strftime('%Y-%m-%d %H:%M:%S')}: "
    aside = [dict(r, set_aside=why + f"after {os.path.basename(source)} (iteration {iteration}), which the run "
                                      f"resumed from") for r in rows if r["iteration"] > iteration]
    aside += [{"line": text.rstrip("\n"), "set_aside": why + f"line {n} {reason}"} for n, text, reason in others]
    for a in aside:
        warn(f"metrics.jsonl: {a['set_aside'][len(why):]}" + (f": the row of iteration {a['iteration']}"
                                                                 if "iteration" in a else "") + f"; kept in {SET_ASIDE}")
    if aside:
        path = os.path.join(run_dir, SET_ASIDE)
        try:
            with open(path, "a") as f:
                f.write("".join(json.dumps(a) + "\n" for a in aside))
        except OSError as e:
            raise WriteError(path, e) from None
    if row is not None and (not keep or keep[-1]["iteration"] != iteration):
        keep.append(row)
    if keep != rows or aside:
        write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in keep))
    best = best_path(run_dir)
    if row is not None and row.get("best_iteration") == iteration and \
            saved_state(run_or_none(run_dir), best).get("iteration") != iteration:
        write_best(run_dir, source)


class Logger:
    """print() that also appends to the run's log.txt."""

    def __init__(self, path):
        self.path = path  # None: print nothing (the other ranks under torchrun)

    def __call__(self, message):
        if self.path is None:
            return
        tqdm.write(message)
        sys.stdout.flush()  # a log redirected to a file (nohup, tee) is block-buffered: each line goes out whole
        try:
            with open(self.path, "a") as f:
                f.write(message + "\n")
        except OSError as e:
            raise WriteError(self.path, e) from None
