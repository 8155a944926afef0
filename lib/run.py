"""A run folder on disk, as one object (Run): runs/{model}_{tag}_{unixtime}/, written by the training loop, read
by generate.py and the report; and atomic_write, through which the program writes every file whole or not at all
(the temporary names it leaves to a kill are the ones a resume removes). Nothing here calls a model.

  settings.json   every flag, derived values, parameter count, versions, git revision, command line, data fingerprint
  log.txt         what was printed
  metrics.jsonl   one JSON object per interval (iteration, seconds, bits per sample, grad norm, samples/s)
  checkpoints/    it0000300.pt ..., best.pt: everything needed to continue exactly (lib/checkpoint.py)
  samples/        it0000300_0.wav ...: generated at every interval, from a fixed sampling seed
  curves.png      train and valid NLL by training time and by iteration
"""
import copy
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

from tqdm import tqdm

from lib import UserError, WriteError, warn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SET_ASIDE = "metrics_set_aside.jsonl"  # rows a resume will redo, and lines that are no metrics rows: kept, not lost


class Run:
    """One run folder, the object every reader and writer of it shares: its layout (every path below it is joined
    here and nowhere else), its record (settings.json, read once per command), its metrics rows, its lock and the
    rule for what may be written over (set_aside, remove_temporary_files). Its checkpoints are lib/checkpoint.py's,
    beneath it. A Run is a path (os.PathLike, and its folder in messages)."""

    def __init__(self, folder):
        join = os.path.join
        self.folder = os.fspath(folder)
        self.record_path, self.log, self.lock = join(self.folder, "settings.json"), join(self.folder, "log.txt"), \
            join(self.folder, ".lock")
        self.metrics_path, self.metrics_set_aside = join(self.folder, "metrics.jsonl"), join(self.folder, SET_ASIDE)
        self.checkpoints = join(self.folder, "checkpoints")
        self.best = join(self.checkpoints, "best.pt")
        self.samples = join(self.folder, "samples")
        self.curves, self.page = join(self.folder, "curves.png"), join(self.folder, "index.html")
        self.tensorboard, self.generated = join(self.folder, "tensorboard"), join(self.folder, "generated")

    def __fspath__(self):
        return self.folder

    def __str__(self):
        return self.folder

    def __repr__(self):
        return f"Run({self.folder!r})"

    def checkpoint(self, iteration):
        return os.path.join(self.checkpoints, f"it{iteration:07d}.pt")

    def sample_paths(self, iteration, n_samples):
        return [os.path.join(self.samples, f"it{iteration:07d}_{k}.wav") for k in range(n_samples)]

    def samples_of(self, iteration):
        """The files of one interval's samples (WAVs and their spectrograms)."""
        return glob.glob(os.path.join(glob.escape(self.samples), f"it{iteration:07d}_*"))

    def all_samples(self):
        return sorted(glob.glob(os.path.join(glob.escape(self.samples), "it*_*.wav")))

    def record(self):
        """settings.json, the one reader of it: a dict with the model's id and its flags (the caller's own copy),
        or a UserError saying why not (no file, not JSON, not a run's settings). Read once per command: again only
        when the file changed (its size or modification time)."""
        try:
            key = self.record_key()
            if key not in _records:
                with open(self.record_path) as f:
                    _records.clear()  # one run's record at a time is all a command rereads
                    _records[key] = json.load(f)
            saved = copy.deepcopy(_records[key])
        except (OSError, ValueError) as e:
            why = "no settings.json" if isinstance(e, FileNotFoundError) else f"settings.json unreadable: {str(e)[:80]}"
            raise UserError(f"{self} is not a run folder ({why}): pass a folder under runs/") from None
        if not (isinstance(saved, dict) and isinstance(saved.get("settings"), dict) and "model_id" in saved):
            raise UserError(f"{self}/settings.json is not a run's settings (no model_id or flags in it)")
        return saved

    def record_or_none(self):
        """The record as record() reads it, or None where there is none to read (nothing to compare with)."""
        try:
            return self.record()
        except UserError:
            return None

    def write_record(self, record):
        """settings.json written whole, and kept as the record this command reads from now on (not read back)."""
        write_text(self.record_path, json.dumps(record, indent=1))
        _records.clear()
        _records[self.record_key()] = copy.deepcopy(record)

    def record_key(self):
        """settings.json as the cache of parsed records knows it: a changed file is another key."""
        stat = os.stat(self.record_path)
        return os.path.abspath(self.record_path), stat.st_mtime_ns, stat.st_size

    def metrics_lines(self):
        """(rows, others) of metrics.jsonl: rows are JSON objects with an integer iteration; others are (line
        number, text, why) for every other line: half-written by a kill or a full disk, or not a metrics row."""
        rows, others = [], []
        if not os.path.exists(self.metrics_path):
            return rows, others
        with open(self.metrics_path) as f:
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

    def metrics(self, quiet=False):
        """The rows of metrics.jsonl. A line that is not a metrics row is dropped with a warning (unless quiet)."""
        rows, others = self.metrics_lines()
        for n, _, why in others if not quiet else ():
            warn(f"{self.metrics_path} line {n} {why}; it is ignored")
        return rows

    def append_metrics(self, row):
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise WriteError(self.metrics_path, e) from None

    def hold(self):
        """An exclusive lock on .lock while this process trains the run (released by release_runs, or by the
        kernel when the process ends, however): a second process on the same run is refused with one line naming
        the first."""
        try:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only mount, another user's folder
            raise UserError(f"{self} cannot be written here ({e.strerror}), so it cannot be trained on: copy it to "
                            f"a writable place and resume the copy; reading, reporting and sampling it (generate.py "
                            f"--out) work as it is") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self} is being trained by process {pid} now: let it finish, or stop it (Ctrl-C "
                            f"saves) and resume then") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _held.append(fd)  # open until the run ends here

    def remove_temporary_files(self):
        """The temporary files a kill left where the run writes: its own names only (atomic_write's NAME.tmp.EXT),
        in the run folder, checkpoints/ and samples/; nothing below them, nothing it does not write."""
        for sub, pattern in TEMPORARY.items():
            folder = os.path.join(self.folder, sub)
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if re.fullmatch(pattern, name):
                    os.remove(os.path.join(folder, name))

    def remove_unstarted(self, folder_too):
        """A new run that failed before its first metrics row or checkpoint: what it wrote is removed (and its
        folder, when this command made it), so that no run that never trained is left to be reported or resumed.
        Anything else in the folder stays."""
        if os.path.exists(self.metrics_path) or os.path.isdir(self.checkpoints):
            return
        started = (self.record_path, self.log, self.lock, self.tensorboard, self.samples)  # before its first row
        for path in filter(os.path.lexists, started):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        if folder_too:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass  # something else is in it


_records = {}  # (path, mtime, size) -> the parsed record
_held = []  # the locks this process holds (Run.hold)


def is_run(path):
    """Whether `path` is a run folder: it holds a record (settings.json)."""
    return os.path.isfile(Run(path).record_path)


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


def make_run_dir(path):
    """--run_dir's folder for a new run (check_new_run_dir), created."""
    check_new_run_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run_dir {path}: {e.strerror}; give a writable place") from None
    return path


def check_new_run_dir(path):
    """--run_dir for a new run: a new path, or an empty folder (or one that holds only the lock of a first command
    stopped before the run's settings.json was written). Anything else is refused in one line: a folder of runs, a
    folder inside a run, a folder of other files, a broken link, an empty path."""
    if not path.strip():
        raise UserError("--run_dir is empty: give the run folder's path (a new or empty folder, or a run to continue)")
    if os.path.lexists(path) and not os.path.exists(path):
        raise UserError(f"--run_dir {path} is a broken link (to {os.readlink(path)}): remove it, or give another path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--run_dir {path} is a file, not a folder: give a folder's path")
    inside = run_above(path)
    if inside:
        raise UserError(f"--run_dir {path} is inside the run {inside}: give a folder outside every run")
    held = sorted(set(os.listdir(path)) - {".lock"}) if os.path.isdir(path) else []
    runs = [n for n in held if is_run(os.path.join(path, n))]
    if runs:
        raise UserError(f"--run_dir {path} is a folder of runs ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''})"
                        f": give it as --runs_dir {path}, or name a new run in it, e.g. --run_dir "
                        f"{os.path.join(path, 'NAME')}")
    if held:
        raise UserError(f"--run_dir {path} holds files that are no run's ({', '.join(held[:3])}"
                        f"{' ...' if len(held) > 3 else ''}): give an empty folder, a new path, or a run to continue")


def run_above(path):
    """The run folder (holding settings.json) that `path` lies inside, or None."""
    here = os.path.dirname(os.path.abspath(path))
    while True:
        run = Run(here)
        if is_run(here) and any(map(os.path.exists, (run.log, run.metrics_path, run.checkpoints))):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def git_info():
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def code_digest():
    """A digest of the code that runs (the scripts and lib/, by content): nodes on another revision, with uncommitted
    edits, or in a copy that is no git checkout differ here whenever their code does."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "lib", "*.py"))):
        digest.update(os.path.relpath(path, REPO).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


def atomic_write(path, write):
    """write(tmp) to a temporary name next to `path`, then rename it over `path`: a kill, a Ctrl-C or a full disk
    never leaves a partial `path`, and the partial temporary file is removed. OSError -> WriteError(path)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"  # the extension stays last: writers such as soundfile pick the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def release_runs():
    while _held:
        os.close(_held.pop())


def new_run_id():
    """The id a run gets at creation, written into settings.json and every checkpoint it saves: a checkpoint copied
    in from another run, even one with the same flags, is never taken for the run's own."""
    return uuid.uuid4().hex


TEMPORARY = {"": r"(settings|metrics|index|curves)\.tmp\.(json|jsonl|html|png)",  # atomic_write's names
             "checkpoints": r"(it\d+|best)\.tmp\.pt", "samples": r"it\d+_\d+\.tmp\.(wav|png)"}


def set_aside(path, why, quiet=False):
    """A file the run would write over, but did not write or cannot read (or one of a history a resume redoes):
    moved to set_aside/ beside it, never replaced or deleted; a warning says why, unless quiet."""
    folder = os.path.join(os.path.dirname(path), "set_aside")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}_{os.path.basename(path)}")
    os.replace(path, target)
    if not quiet:
        warn(f"{path} is {why}: set aside as {target}, not replaced")


class Logger:
    """print() that also appends to the run's log.txt."""

    def __init__(self, path):
        self.path = path  # None: print nothing (the other ranks under torchrun)

    def __call__(self, message):
        if self.path is None:
            return
        try:
            tqdm.write(message)
            sys.stdout.flush()  # a log redirected to a file (nohup, tee) is block-buffered: each line goes out whole
        except OSError:  # the terminal is gone (a closed ssh session): the line still goes to log.txt
            pass
        try:
            with open(self.path, "a") as f:
                f.write(message + "\n")
        except OSError as e:
            raise WriteError(self.path, e) from None
