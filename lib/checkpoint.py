"""A run's checkpoints: what one holds, how it is written and read, and which one a run continues from.

  RUN/checkpoints/it0000300.pt   everything needed to continue exactly (build): the model's id, the run's id,
                                 every flag, the sample rate, the weights, Adam's state, the training state
                                 (iteration, clocks, best valid NLL; the interval's running sums when saved
                                 mid-interval), the interval's metrics row (None mid-interval) and h
  RUN/checkpoints/best.pt        a copy of the one with the best valid NLL so far

Written to a temporary file and renamed: a kill or a full disk never leaves a partial one. Read only when it is
the run's own (its run id; the iteration its name says), so a file copied in from another run is never continued
from, pruned or measured. `resume` gathers everything a session continues from; `restore` puts it back. The
functions take the run (lib.run.Run) whose checkpoints they are: its paths and its record come from it.
"""
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch

from lib import MODELS, UserError, WriteError, warn
from lib.cli import script_of
from lib.run import atomic_write, set_aside, write_text
from lib.settings import RESUMABLE, as_run_did


def build(session, state, h, row):
    """The checkpoint of a session at `state` (row: the interval's metrics row, None when saved mid-interval).
    No global RNG state: nothing draws from it."""
    return {"model_id": session.model_id, "module": MODELS.get(session.model_id), "run_id": session.run_id,
            "settings": vars(session.args),
            "sample_rate": session.sample_rate, "model": session.model.state_dict(),
            "optimizer": session.optimizer.state_dict(), "state": dict(state), "row": row,
            "h": None if h is None else h.cpu()}


def paths(run):
    """The run folder's interval checkpoints it0000300.pt ..., oldest first by the iteration in the name (padded
    to 7 digits, so from iteration 10,000,000 on text order would be wrong). What they hold: read checks it."""
    folder = run.checkpoints
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if re.fullmatch(r"it\d+\.pt", n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[2:-3]))]  # by number: it10000000.pt last


def save(run, ckpt):
    """Written to a temporary file and renamed (lib.run.atomic_write) -> its path. A short write (full disk, quota,
    file size limit) is a WriteError, and no partial file is left."""
    path = run.checkpoint(ckpt["state"]["iteration"])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        keep_if_not_own(run, path)
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


def write_best(run, checkpoint):
    """checkpoints/best.pt: a copy of the checkpoint with the best valid NLL so far, written atomically."""
    try:
        keep_if_not_own(run, run.best)
    except OSError as e:
        raise WriteError(run.best, e) from None
    atomic_write(run.best, lambda tmp: shutil.copyfile(checkpoint, tmp))


def keep_if_not_own(run, path):
    """Before the run writes `path`: a file there that is not the run's own readable checkpoint (another run's, one
    resume skipped as unreadable) is set aside, never replaced."""
    if os.path.exists(path):
        _, problem = read(run.record_or_none(), path, mmap=True)
        if problem:
            set_aside(path, problem)


def best_of_run(run, iteration):
    """The run's best checkpoint, of `iteration` (the metrics' best): best.pt where it is the run's own and holds
    that iteration, else the run's own checkpoint of that iteration, copied to best.pt again (what was there is set
    aside) -> (checkpoint or None, '' or one line saying what was wrong and what was done)."""
    record, best = run.record_or_none(), run.best
    ckpt, problem = read(record, best) if os.path.exists(best) else (None, "missing")
    if ckpt is not None and ckpt["state"].get("iteration") == iteration:
        return ckpt, ""
    problem = problem or f"of iteration {ckpt['state'].get('iteration')}"
    source = run.checkpoint(iteration)
    ckpt, theirs = read(record, source) if os.path.exists(source) else (None, "missing")
    if ckpt is None:
        return None, (f"best.pt is {problem}, and the run's checkpoint of its best iteration {iteration}, "
                      f"{os.path.basename(source)}, is {theirs}")
    if os.path.exists(best):
        set_aside(best, problem)
    write_best(run, source)
    return ckpt, f"best.pt was {problem}: rebuilt from {os.path.basename(source)}, the run's best"


def keep_newest(run, keep):
    """Only the run's newest `keep` interval checkpoints stay; files of other runs (or damaged ones) are not
    counted and never removed (best.pt is a copy: what it came from may go)."""
    record = run.record_or_none()
    own = [p for p in paths(run) if read(record, p, mmap=True)[0] is not None]
    for old in own[:-keep]:
        os.remove(old)


def load(path, mmap=False):
    """A checkpoint's dict, on the CPU (mmap: tensors mapped, not read: to look at its state cheaply). Checkpoints
    hold plain Python state beside tensors (settings, the metrics row), so they are not loaded weights-only: load
    only checkpoints you trust, as with any pickle."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def read(record, path, mmap=False):
    """(checkpoint, '') when the file at `path` loads and is the run's own (`record`: its settings.json, or None when
    there is none to compare with), else (None, why not)."""
    try:
        ckpt = load(path, mmap)
        if not isinstance(ckpt, dict) or not {"model_id", "settings", "model", "state"} <= set(ckpt):
            raise ValueError("not a checkpoint of this repository")
    except Exception as e:  # torch raises many types for damaged files
        return None, f"unreadable ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
    foreign = not_of_run(record, ckpt, os.path.basename(path)) if record is not None else ""
    return (None, f"not this run's ({foreign})") if foreign else (ckpt, "")


def not_of_run(record, ckpt, name):
    """'' if the checkpoint file `name` was saved by the run whose settings.json is `record`, else how it differs:
    another run's id (runs made before ids: another model or other flags), or an iteration other than its name's."""
    if ckpt["model_id"] != record.get("model_id"):
        return f"a {ckpt['model_id']} checkpoint in a {record.get('model_id')} run"
    if ckpt.get("run_id") != record.get("run_id"):
        return f"saved by run {ckpt.get('run_id') or '(made before run ids)'}, this run is {record.get('run_id')}"
    named = re.fullmatch(r"it(\d+)\.pt", name)
    held = ckpt["state"].get("iteration") if isinstance(ckpt["state"], dict) else None
    if named and held != int(named.group(1)):
        return f"it holds iteration {held}, not {int(named.group(1))}"
    raw = record.get("settings", {})
    if all(ckpt["settings"].get(k) == raw.get(k) for k in ckpt["settings"].keys() | raw.keys() if k not in RESUMABLE):
        return ""  # the same flags, as the run's own checkpoints hold: nothing to translate (as_run_did)
    theirs, ours = as_run_did(ckpt["model_id"], ckpt["settings"]), as_run_did(ckpt["model_id"], record.get("settings", {}))
    differ = sorted(k for k in theirs.keys() & ours.keys() if k not in RESUMABLE and theirs[k] != ours[k])
    return f"--{differ[0]} {theirs[differ[0]]!r}, the run has {ours[differ[0]]!r}" if differ else ""


def newest(run, verb, record=None):
    """(path, checkpoint) of the run's newest own checkpoint that loads, newest first, best.pt among them by the
    iteration it holds: a damaged one (truncated, empty) or another run's is skipped with a warning. None if the
    run has no such checkpoint. record: its settings.json, when already read."""
    record = record if record is not None else run.record_or_none()
    candidates = paths(run)[::-1]
    best, _ = read(record, run.best, mmap=True) if os.path.exists(run.best) else (None, "")
    if best is not None:  # a copy of an interval checkpoint, which may be gone or damaged
        at = next((i for i, p in enumerate(candidates)
                   if int(os.path.basename(p)[2:-3]) < best["state"]["iteration"]), len(candidates))
        candidates.insert(at, run.best)
    for i, path in enumerate(candidates):
        then = f"{verb} {os.path.basename(candidates[i + 1])}" if i + 1 < len(candidates) else "no older checkpoint"
        ckpt, problem = read(record, path)
        if problem:
            warn(f"{os.path.basename(path)} is {problem}; {'' if problem.startswith('unreadable') else 'skipped: '}{then}")
            continue
        return path, ckpt
    return None


def own(run, path):
    """The checkpoint at `path`, checked to be the run's own and to load; a one-line UserError if not."""
    ckpt, problem = read(run.record_or_none(), path)
    if problem:
        raise UserError(f"{path} is {problem}")
    return ckpt


def saved_state(record, path):
    """The training state ({'iteration': ...}) in the run's own checkpoint at `path`; {} if it is missing, damaged
    or not the run's."""
    ckpt, _ = read(record, path, mmap=True) if os.path.exists(path) else (None, "")
    return ckpt["state"] if ckpt is not None else {}


# ---- resuming a run

@dataclass
class Resumed:
    """What a session continues from: the run folder, its settings.json, and the newest own readable checkpoint
    with its path (both None for a run killed before its first checkpoint: it starts again in its own folder)."""
    run: object  # lib.run.Run
    record: dict  # settings.json, read once
    path: str = None
    ckpt: dict = None

    def __post_init__(self):
        source = self.ckpt or self.record
        self.model_id = source["model_id"]
        self.settings = as_run_did(self.model_id, source["settings"])  # the run's flags under today's names (from
        # the checkpoint: what the run last trained with)


def resume(run, model_id, world_size):
    """Everything a session continues the run in `run` from, checked: the run's model, its number of
    processes, and a history it would not replace (a run with metrics rows or checkpoint files but no own
    readable checkpoint is refused: it never starts over)."""
    record = run.record()
    found = newest(run, "resuming from", record)
    if found is None:
        refuse_to_start_over(run, record)
    resumed = Resumed(run, record, *(found or (None, None)))
    if resumed.model_id != model_id:
        raise UserError(f"{run} is a {resumed.model_id} run, not {model_id}: resume it with "
                        f"{script_of(resumed.model_id)}")
    saved_world = record.get("world_size", 1)
    if saved_world != world_size:
        raise UserError(f"{run} was trained on {saved_world} process(es), this is {world_size}: resume it with "
                        f"the same torchrun --nproc_per_node")
    return resumed


def refuse_to_start_over(run, record):
    """A UserError when the run folder holds a history that starting from iteration 0 there would replace."""
    rows = run.metrics(quiet=True)
    files = paths(run) + [p for p in [run.best] if os.path.exists(p)]
    if not rows and not files:
        return  # killed before its first checkpoint: nothing to lose
    history = (f"metrics up to iteration {rows[-1]['iteration']}" if rows else "no metrics") + \
        (f" and {len(files)} checkpoint file(s), none of them its own and readable" if files else
         " and no checkpoint (checkpoints/it*.pt, best.pt)")
    command = record.get("command", "").split()
    again = f"python {' '.join(command)}" if command and "--resume" not in command else \
        f"python {script_of(record.get('model_id'))} with the flags in {run.record_path}"
    raise UserError(f"{run} cannot be resumed: it has {history}, and starting again at iteration 0 would "
                    f"replace its history; to train these settings anew in a new run folder: {again}")


def restore(resumed, model, optimizer, rows, device, capturable):
    """The checkpoint's weights and Adam state put back, and what a kill left in the folder repaired -> (state, h):
    the training state ({} from a run killed before its first checkpoint) and this rank's rows of h."""
    if resumed.ckpt is None:
        return {}, None
    ckpt = resumed.ckpt
    model.load_state_dict(ckpt["model"])
    load_optimizer(optimizer, ckpt["optimizer"], capturable)
    h = None if ckpt["h"] is None else ckpt["h"][:, rows].to(device)
    return dict(ckpt["state"]), h


def load_optimizer(optimizer, state, capturable):
    """The saved Adam state, capturable or not as this session asks (--cuda_graph_step): load_state_dict restores
    the saved param groups' flag, with which a run made without graphs could not be captured (and one made with
    them would keep its step counts' capturable path when eager)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["capturable"] = capturable


def repair_record(run, iteration, row, source):
    """On resume from the checkpoint `source` of `iteration`: metrics rows logged after it (and lines that are no
    metrics rows) move to RUN/metrics_set_aside.jsonl, each with why; if the checkpoint ends an interval (it holds
    the interval's row), put back that row and best.pt where a kill came before they were written."""
    rows, others = run.metrics_lines()
    keep = [r for r in rows if r["iteration"] <= iteration]
    why = f"set aside on {time.strftime('%Y-%m-%d %H:%M:%S')}: "
    aside = [dict(r, set_aside=why + f"after {os.path.basename(source)} (iteration {iteration}), which the run "
                                      f"resumed from") for r in rows if r["iteration"] > iteration]
    aside += [{"line": text.rstrip("\n"), "set_aside": why + f"line {n} {reason}"} for n, text, reason in others]
    for a in aside:
        warn(f"metrics.jsonl: {a['set_aside'][len(why):]}" + (f": the row of iteration {a['iteration']}"
                                                                 if "iteration" in a else "") + f"; kept in {os.path.basename(run.metrics_set_aside)}")
    for a in aside:  # the samples of intervals set aside are kept with their rows, not overwritten when redone
        for f in run.samples_of(a["iteration"]) if "iteration" in a else ():
            set_aside(f, "", quiet=True)
    if aside:
        path = run.metrics_set_aside
        try:
            with open(path, "a") as f:
                f.write("".join(json.dumps(a) + "\n" for a in aside))
        except OSError as e:
            raise WriteError(path, e) from None
    if row is not None and (not keep or keep[-1]["iteration"] != iteration):
        keep.append(row)
    if keep != rows or aside:
        write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
    if row is not None and row.get("best_iteration") == iteration and \
            saved_state(run.record_or_none(), run.best).get("iteration") != iteration:
        write_best(run, source)
