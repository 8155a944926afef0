"""The training loop both models share: flags, run folders, checkpoints, resume, evaluation, samples.

A model answers `model(x, h) -> (logits, h, aux)` on a (B, overlap + seq_len) chunk of int levels, where
logits[:, t] predicts x[:, overlap + t]; it samples as lib/sample.py describes; it has attributes `overlap`,
`seq_len`, `q_levels`. `train_main` does the rest: one code path for two_tier.py and baseline.py.

A run lives in runs/{model}_{tag}_{unixtime}/:
  settings.json   every flag, derived values, parameter count, versions, git revision, command line
  log.txt         what was printed
  metrics.jsonl   one JSON object per interval (iteration, seconds, bits per sample, grad norm, samples/s)
  checkpoints/    it0000300.pt ...: everything needed to continue exactly (written atomically)
  samples/        it0000300_0.wav ...: generated at every interval, from a fixed sampling seed
  curves.png      train and valid NLL by training time and by iteration

Faults cost at most one step: Ctrl-C or SIGTERM saves a checkpoint mid-interval and exits 130 / 143; a
checkpoint is written only from finite values; --resume skips a damaged newest checkpoint and repairs what a
kill left (metrics row, samples, temporary files); a failed write is one line naming the last checkpoint.
"""
import argparse
import copy
import fcntl
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import ArgumentParser, Interrupted, UserError, WriteError, atomic_write, cache, check_torch, dist
from lib.audio import warn, write_wav
from lib.data import DEFAULT_DATA, ChunkBatches, Segments, eval_chunks, load_splits
from lib.quantize import NORMS, QTYPES, check_q_levels, dequantize
from lib.report import plot_curves, read_metrics, report
from lib.sample import generate

SCRIPTS = {"twotier": "two_tier.py", "baseline": "baseline.py"}  # model_id -> the script that trains it
LN2 = math.log(2)
EVAL_CHUNK = 2048  # samples per evaluation chunk (rounded to whole training chunks)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# flags that may change when a run is resumed; every other setting comes from the run
RESUMABLE = {"resume", "stop_time", "stop_iters", "print_time", "print_iters", "device", "threads", "cuda_graph",
             "valid_clips", "n_samples", "sample_secs", "test_on_best", "patience", "dry_run", "data", "keep_checkpoints",
             "accept_changed_data"}  # --data: when the data there is the run's own (its fingerprint)
PASSES_WARNING = 20  # warn when the budget would pass over the train split more often than this
PRECISIONS = ("fp32", "tf32", "bf16")
SYNC_STEPS = 16  # on CUDA the step runs ahead of the host; every this many steps it waits and checks the loss
SPEED_STEPS = 5  # the speed line comes after this many steps (the first step, a warm-up, is not counted)
RECHECK_STEPS = 50  # ... and is said again, measured over this many more, if it was off by over 1.5x
PROGRESS_SECS = 300  # without a terminal, a plain progress line this often (wall seconds)


def add_training_args(p, presets):
    g = p.add_argument_group("data and quantization")
    g.add_argument("--data", default=DEFAULT_DATA, help="folder made by python -m lib.prepare, or one audio file")
    g.add_argument("--clip_secs", type=float, default=8.0, help="clip length (seconds) when --data is one file")
    g.add_argument("--q_levels", type=int, default=256, help="quantization levels (even, 2..65536)")
    g.add_argument("--qtype", default="linear", choices=QTYPES, help="quantization type")
    g.add_argument("--zero_dc", action="store_true", help="subtract each clip's mean before quantizing")
    g.add_argument("--norm", default="none", choices=NORMS, help="'minmax': stretch each clip to [-1, 1] (original)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=128,
                   help="clips per batch (per process under torchrun: the global batch is N times this)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip each gradient element to [-c, c] (0 = off)")
    g.add_argument("--seed", type=int, default=123, help="seed of the init, the data order and the samples")
    g = p.add_argument_group("budget, cadence and runs")
    g.add_argument("--stop_time", type=float, default=12.0, help="stop after this much training time (hours)")
    g.add_argument("--stop_iters", type=int, default=0, help="stop after this many iterations (0 = no limit)")
    g.add_argument("--print_time", type=float, default=3600.0,
                   help="log, evaluate, checkpoint and sample every this much training time (seconds)")
    g.add_argument("--print_iters", type=int, default=0, help="... or every this many iterations (overrides "
                   "--print_time when > 0)")
    g.add_argument("--valid_clips", type=int, default=0, help="evaluate valid NLL on this many clips (0 = all)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop when valid NLL has not improved for this many intervals (0 = off: a run spends its "
                        "whole budget, and checkpoints/best.pt keeps the best weights anyway)")
    g.add_argument("--test_on_best", action="store_true", help="also evaluate test NLL whenever valid NLL improves "
                   "(it is always evaluated at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep only the newest K interval checkpoints (and best.pt) (default: 0, keep every one)")
    g.add_argument("--n_samples", type=int, default=4, help="sequences generated at every interval")
    g.add_argument("--sample_secs", type=float, default=4.0, help="length of each generated sequence (seconds)")
    g.add_argument("--name", default=None, help="tag in the run name {model}_{tag}_{unixtime} (default from flags)")
    g.add_argument("--runs_dir", default="runs", help="folder that holds the run folders")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    g.add_argument("--precision", default="tf32", choices=PRECISIONS,
                   help="matrix products on CUDA: fp32, tf32 (fp32 storage, TF32 tensor cores), or bf16 autocast "
                        "(weights, optimizer state and loss stay fp32); the CPU always computes in fp32")
    g.add_argument("--cuda_graph", action="store_true",
                   help="on CUDA, capture the training step as CUDA graphs and replay them (lib/cuda_graph.py); off "
                        "until measured and checked on a GPU (tests/test_cuda.py); not with torchrun")
    g.add_argument("--no_cuda_graph", dest="cuda_graph", action="store_false", default=argparse.SUPPRESS,
                   help="turn --cuda_graph off, e.g. to resume such a run where there is no CUDA (default: off)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads of torch; 0 = torch's default (one per core)")
    g.add_argument("--preset", default=None, choices=sorted(presets),
                   help="named set of defaults that flags given after it still override: " +
                   "; ".join(f"{name} = " + " ".join(f"--{k} {v}" for k, v in values.items())
                             for name, values in sorted(presets.items())))
    g.add_argument("--dry_run", action="store_true", help="print the settings and parameter count, then exit")
    g.add_argument("--accept_changed_data", action="store_true",
                   help="with --resume: train on, although the data differs from what the run was trained on")


def build_parser(script, doc, add_model_args, presets):
    parser = ArgumentParser(prog=f"python {script}", description=doc)
    add_model_args(parser)
    add_training_args(parser, presets)
    return parser


def train_main(model_id, doc, add_model_args, build_model, default_tag, presets, argv=None):
    """Entry point of a model script: bad input is one line on stderr and exit status 2."""
    parser = build_parser(SCRIPTS[model_id], doc, add_model_args, presets)
    threads = torch.get_num_threads()
    try:
        code = train(model_id, parser, build_model, default_tag, presets, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the loop's own handlers (start-up), or a second Ctrl-C while saving
        print("\ninterrupted; nothing more was saved (no partial file is left)", file=sys.stderr)
        code = 130
    except Exception:  # a bug: its traceback, then the same orderly end as any other
        traceback.print_exc()
        code = 1
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests)
    dist.cleanup()  # here, with no exception (and its frames) holding the training's objects
    sys.exit(code)


def parse_settings(model_id, parser, presets, argv):
    """Resolved flags: defaults < preset < command line; on --resume, the run's settings < command line.
    -> (args, resumed): resumed is None for a new run, else (checkpoint path, checkpoint), both None for a run
    killed before its first checkpoint (it starts again from iteration 0 in its own folder)."""
    first, _ = parser.parse_known_args(argv)
    if first.resume is None:
        if first.preset:
            parser.set_defaults(**presets[first.preset])
        args = parser.parse_args(argv)
        args.data = os.path.abspath(args.data)  # recorded so: the report and --resume find it from any folder
        return args, None
    run = read_run_settings(first.resume)
    found = load_latest_checkpoint(first.resume, "resuming from")
    ckpt_path, ckpt = found or (None, None)
    saved_id, saved = (ckpt["model_id"], ckpt["settings"]) if ckpt else (run["model_id"], run["settings"])
    if saved_id != model_id:
        raise UserError(f"{first.resume} is a {saved_id} run, not {model_id}: resume it with "
                        f"{SCRIPTS.get(saved_id, 'the script that made it')}")
    # a flag added after the run was made takes its default (what the run did without it)
    saved = {**{a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}, **saved}
    args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))  # explicit flags override saved ones
    changed = [k for k in vars(args) if k not in RESUMABLE and getattr(args, k) != saved.get(k)]
    if changed:
        raise UserError(f"--{changed[0]} cannot change when resuming (the run has {saved.get(changed[0])!r}); "
                        f"only {', '.join('--' + k for k in sorted(RESUMABLE - {'resume'}))} can")
    args.data = os.path.abspath(args.data)
    args.accept_changed_data = first.accept_changed_data  # this session's word only: never carried to the next
    return args, (ckpt_path, ckpt)


def check_data(args, splits):
    """On resume: the data must be what the run trained on (by content, wherever it lies now), unless
    --accept_changed_data; then the run's fingerprint becomes the new data's, and the change is logged."""
    run = read_run_settings(args.resume)
    old, new = run.get("data_fingerprint"), cache.fingerprint(splits)
    if old is None:
        warn(f"{args.resume} was made before runs recorded their data's fingerprint: the data is not checked")
        return
    change = cache.describe_change(old, new)
    if not change:
        return
    if not args.accept_changed_data:
        raise UserError(f"the data in {args.data} differs from what {args.resume} was trained on ({change}): "
                        f"resume with its own data, or add --accept_changed_data to train on this")
    warn(f"training on changed data ({change}), as --accept_changed_data asks")
    run["data_fingerprint"] = new
    run.setdefault("data_changes", []).append(change)
    write_text(os.path.join(args.resume, "settings.json"), json.dumps(run, indent=1))


def hold_run(run_dir):
    """An exclusive lock on RUN/.lock while this process trains the run (released at the end of train(), or by the
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


def read_run_settings(run_dir):
    try:
        with open(os.path.join(run_dir, "settings.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{run_dir} is not a run folder (no readable settings.json): pass a folder under runs/") \
            from None


def checkpoint_paths(run_dir):
    """The run's checkpoints it0000300.pt ..., oldest first (names are zero-padded iteration numbers)."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in sorted(names) if re.fullmatch(r"it\d+\.pt", n)]


def load_latest_checkpoint(run_dir, verb):
    """(path, checkpoint) of the newest checkpoint that loads, newest first: a damaged one (truncated, empty) is
    skipped with a warning. None if the run has no checkpoint that loads."""
    paths = checkpoint_paths(run_dir)[::-1]
    try:
        run = read_run_settings(run_dir)
    except UserError:
        run = None  # nothing to compare with
    for i, path in enumerate(paths):
        then = f"{verb} {os.path.basename(paths[i + 1])}" if i + 1 < len(paths) else "no older checkpoint"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(ckpt, dict) or not {"model_id", "settings", "model"} <= set(ckpt):
                raise ValueError("not a checkpoint of this repository")
        except Exception as e:  # torch raises many types for damaged files
            warn(f"{os.path.basename(path)} is unreadable ({str(e).splitlines()[0][:100]}); {then}")
            continue
        foreign = run and not_of_run(run, ckpt)
        if foreign:
            warn(f"{os.path.basename(path)} is not this run's ({foreign}); skipped: {then}")
            continue
        return path, ckpt
    return None


def not_of_run(run, ckpt):
    """'' if the checkpoint was made by the run whose settings.json is `run`, else how it differs."""
    if ckpt["model_id"] != run.get("model_id"):
        return f"a {ckpt['model_id']} checkpoint in a {run.get('model_id')} run"
    theirs, ours = ckpt["settings"], run.get("settings", {})
    differ = sorted(k for k in theirs.keys() & ours.keys() if k not in RESUMABLE and theirs[k] != ours[k])
    return f"--{differ[0]} {theirs[differ[0]]!r}, the run has {ours[differ[0]]!r}" if differ else ""


def set_precision(precision):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def make_optimizer(model, lr, capturable=False):
    """Adam, fused into one kernel per step (on the CPU too: it gives the same results run after run);
    capturable (its step counts on the GPU) for a CUDA graph."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def load_optimizer(optimizer, state, capturable):
    """The saved Adam state, capturable or not as this session's --cuda_graph asks: load_state_dict restores the
    saved param groups' flag, with which a run made without graphs could not be captured (and one made with
    them would keep its step counts' capturable path when eager)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["capturable"] = capturable


def check_settings(args):
    check_q_levels(args.q_levels, args.qtype)
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number (got {value})")
    positive = {"batch_size": args.batch_size, "lr": args.lr, "stop_time": args.stop_time,
                "print_time": args.print_time, "clip_secs": args.clip_secs}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name} must be positive (got {value})")
    for name in ("stop_iters", "print_iters", "valid_clips", "n_samples", "grad_clip", "sample_secs", "threads",
                 "patience", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    no_cuda = args.device == "cpu" or not torch.cuda.is_available()
    if args.precision == "bf16" and no_cuda:
        raise UserError("this run trains in bf16 (--precision), which is for CUDA: resume it where there is a GPU"
                        if args.resume else
                        "--precision bf16 is for CUDA; on the CPU use fp32 (the default tf32 means fp32 there)")
    if args.cuda_graph and no_cuda:
        raise UserError("--cuda_graph is for CUDA: no CUDA device here; " +
                        ("add --no_cuda_graph to resume without it" if args.resume else "leave it out"))
    if args.cuda_graph and dist.world_size() > 1:
        raise UserError("--cuda_graph does not work with torchrun yet: leave it out")


def train(model_id, parser, build_model, default_tag, presets, argv):
    check_torch(torch.__version__)
    args, resumed = parse_settings(model_id, parser, presets, argv)
    check_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)  # checks the model flags and fills derived ones
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        print(f"{model_id}: {n_params:,} parameters")
        return 0
    world, saved_world = dist.world_size(), resumed and read_run_settings(args.resume).get("world_size", 1)
    if resumed and saved_world != world:
        raise UserError(f"{args.resume} was trained on {saved_world} process(es), this is {world}: resume it with "
                        f"the same torchrun --nproc_per_node")
    device = dist.setup(args.device)  # None unless torchrun started several processes
    try:
        return train_on(model_id, args, model, n_params, default_tag, resumed, device, world)
    finally:
        while _held:  # the run's lock (hold_run)
            os.close(_held.pop())


def hold_on_device(splits, device, q_levels):
    """The splits as levels on the device, each distinct split once (one file's data serves as all three)."""
    held = {}
    for s in splits.values():
        if id(s) not in held:
            held[id(s)] = s.on_device(device, q_levels)
    return {name: held[id(s)] for name, s in splits.items()}


def train_on(model_id, args, model, n_params, default_tag, resumed, device, world):
    rank = dist.rank()
    if resumed and rank == 0:
        hold_run(args.resume)  # before anything is read or repaired: one process trains a run at a time
    if resumed and not os.path.exists(args.data):
        raise UserError(f"the run's data {args.data} is not there: if it moved, resume with --data NEW_PLACE "
                        f"(the data there is checked against the run's)")
    splits, sample_rate = load_splits(args.data, args.clip_secs)  # memory-mapped, quantized per batch
    if resumed:
        check_data(args, splits)
    for split in splits.values():
        split.quantized(args.q_levels, args.qtype, args.zero_dc, args.norm)
    batches = ChunkBatches(splits["train"], args.batch_size, model.seq_len, model.overlap, args.q_levels, args.seed,
                           rank, world)
    for name in ("valid", "test"):
        Segments(splits[name], model.seq_len, f"{name} clips")  # refuses clips shorter than a chunk, now

    device = device or torch.device("cuda" if args.device == "cuda" or
                                    (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and args.q_levels <= 256:  # the splits as uint8 levels on the GPU, where they fit
        need = sum(int(s.lengths.sum()) for s in {id(s): s for s in splits.values()}.values())
        if need < 0.25 * torch.cuda.mem_get_info(device)[0]:
            splits = hold_on_device(splits, device, args.q_levels)
            batches.segments.split = splits["train"]  # the same segments, gathered on the GPU
    set_precision(args.precision)
    model.to(device)
    optimizer = make_optimizer(model, args.lr, capturable=args.cuda_graph)
    run_dir = args.resume or (new_run_dir(args.runs_dir, f"{model_id}_{args.name or default_tag(args)}")
                              if rank == 0 else None)
    if world > 1:
        run_dir = dist.share(run_dir)
    if rank == 0 and not resumed:
        hold_run(run_dir)
    try:
        return start(model_id, args, model, optimizer, splits, sample_rate, batches, device, n_params, run_dir,
                     resumed)
    except WriteError as e:
        saved = checkpoint_paths(run_dir)
        print(f"error: {e}; " + (f"the last checkpoint is {os.path.basename(saved[-1])}" if saved else
                                 "no checkpoint had been written"), file=sys.stderr)
        return 1


def start(model_id, args, model, optimizer, splits, sample_rate, batches, device, n_params, run_dir, resumed):
    """Restore a resumed run (repairing what a kill left) or write a new run's settings; then train."""
    ckpt_path, ckpt = resumed or (None, None)
    world, main = dist.world_size(), dist.rank() == 0  # only rank 0 (main) writes
    ctx = dict(args=args, model=model, optimizer=optimizer, splits=splits, sample_rate=sample_rate,
               run_dir=run_dir, device=device, model_id=model_id, first_interval=True, world=world, main=main,
               net=dist.wrap(model, device) if world > 1 else model,  # what the training steps call
               chunks_per_epoch=len(batches.segments) * batches.chunks_per_clip)  # one pass: this many chunks
    state = {"iteration": 0, "train_secs": 0.0, "wall_secs": 0.0, "best_valid": float("inf"), "best_iteration": None,
             "since_best": 0, "interval": None}
    h = None
    if resumed and main:
        remove_temporary_files(run_dir)
    elif main:
        settings = {"model_id": model_id, "settings": vars(args), "parameters": n_params, "world_size": world,
                    "sample_rate": sample_rate, "clips": {k: [s.n_clips, int(s.lengths.sum())] for k, s in splits.items()},
                    "data_fingerprint": cache.fingerprint(splits),
                    "device": str(device), "command": " ".join(sys.argv), "git": git_info(),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "numpy": np.__version__}}
        write_text(os.path.join(run_dir, "settings.json"), json.dumps(settings, indent=1))
    log = ctx["log"] = Logger(os.path.join(run_dir, "log.txt") if main else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_optimizer(optimizer, ckpt["optimizer"], args.cuda_graph)
        state.update(ckpt["state"])
        h = None if ckpt["h"] is None else ckpt["h"][:, batches.rows].to(device)  # this rank's rows
    log(f"{'resuming' if resumed else 'run'} {run_dir} from iteration {state['iteration']}" +
        (f" ({os.path.basename(ckpt_path)})" if ckpt_path else ""))
    if resumed and main:
        repair_interval_end(ctx, state["iteration"], ckpt.get("row") if ckpt else None)
    log(f"{model_id}: {n_params:,} parameters | device {device} float32 | torch {torch.__version__}" +
        (f" | {torch.get_num_threads()} CPU threads" if device.type == "cpu" else "") +
        (f" | {world} processes (torchrun), global batch {batches.batch_size}" if world > 1 else ""))
    log("settings: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
    segments = batches.segments
    log(f"data {args.data}: {sample_rate} Hz, clips train/valid/test {splits['train'].n_clips}/"
        f"{splits['valid'].n_clips}/{splits['test'].n_clips} ({splits['train'].lengths.sum() / sample_rate / 3600:.2f} "
        f"h of training audio, {'on the GPU as levels' if torch.is_tensor(splits['train'].pcm) else 'memory-mapped'});"
        f" {len(segments)} train segments of {segments.length} samples, "
        f"chunks of {model.seq_len} samples (+{model.overlap} overlap), {batches.chunks_per_clip} per segment")
    if batches.with_replacement:
        log(f"note: {len(segments)} train segments < the batch of {batches.batch_size}: "
            f"each batch draws segments with replacement")
    with Interrupts(second_aborts=world == 1, say=log) as interrupts:
        ctx["stop"] = lambda: interrupts.signum is not None
        return loop(ctx, batches, state, h, interrupts)


def repair_interval_end(ctx, iteration, row):
    """On resume: forget metrics rows logged after the checkpoint; if the checkpoint ends an interval (it holds the
    interval's row), put back that row and the interval's samples where a kill came before they were written."""
    run_dir = ctx["run_dir"]
    rows = read_metrics(run_dir)
    keep = [r for r in rows if r["iteration"] <= iteration]
    if row is not None and (not keep or keep[-1]["iteration"] != iteration):
        keep.append(row)
    path = os.path.join(run_dir, "metrics.jsonl")
    if keep != rows or (os.path.exists(path) and len(open(path).read().splitlines()) != len(rows)):
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    if row is not None and row.get("best_iteration") == iteration and (
            not os.path.exists(best) or load_checkpoint_state(best).get("iteration") != iteration):
        write_best(run_dir, os.path.join(run_dir, "checkpoints", f"it{iteration:07d}.pt"))
    if row is not None and any(not os.path.exists(p) for p in sample_paths(ctx, iteration)):
        ctx["log"](f"writing the samples of iteration {iteration}, which a stop had cut off")
        write_samples(ctx, iteration)


def load_checkpoint_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["state"]
    except Exception:  # damaged: treated as missing
        return {}


def remove_temporary_files(run_dir):
    """Temporary files (*.tmp*) that a kill left in the run folder: partial checkpoints, samples, metrics."""
    for root, _, files in os.walk(run_dir):
        for name in files:
            if ".tmp" in name:
                os.remove(os.path.join(root, name))


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM during the loop: the first sets .signum, and the loop saves after the current
    step and exits 128 + signum; a second one aborts at once (KeyboardInterrupt), even inside the save, whose
    temporary file is then removed (lib.atomic_write). Handlers are restored afterwards.
    Under torchrun a second signal is ignored: Ctrl-C reaches every process and torchrun, which then sends each
    a SIGTERM of its own; torchrun kills the processes itself if they take too long (30 s)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_aborts=True, say=None):
        self.second_aborts, self.say = second_aborts, say
        self.step_secs = None  # the measured time of a step, once known (for the line a first signal prints)

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            if self.second_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.say is not None:  # at once: a step can take many seconds, and silence invites a second Ctrl-C
            about = f" (about {duration(self.step_secs)})" if self.step_secs else ""
            self.say(f"stopping after the current step{about}, then saving a checkpoint" +
                     ("; a second Ctrl-C stops at once, without saving" if self.second_aborts else ""))

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFinite(Exception):
    """Training produced a non-finite value; nothing from it was saved."""


def new_interval():
    return {"bits": 0.0, "grad_norm": 0.0, "steps": 0, "secs": 0.0}


def loop(ctx, batches, state, h, interrupts):
    args, model, device, log = ctx["args"], ctx["model"], ctx["device"], ctx["log"]
    world, main = ctx["world"], ctx["main"]

    def stopping(by_time=True):
        return (args.stop_iters and state["iteration"] >= args.stop_iters) or \
            (by_time and state["train_secs"] >= args.stop_time * 3600) or patience_reached(args, state)

    interval = state.pop("interval", None) or new_interval()  # a checkpoint saved by Ctrl-C holds its sums
    due = state.pop("interval_due", False)  # ... and whether the interval's end was cut short
    if stopping() and not due:
        log(f"nothing to do: the run is at iteration {state['iteration']}, {state['train_secs'] / 3600:.3f} h "
            f"(--stop_iters {args.stop_iters}, --stop_time {args.stop_time})")
        return 0
    wall_start = time.time() - state["wall_secs"]
    samples_per_step = world * args.batch_size * model.seq_len
    progress = Progress(args, state, log, device, shown=main)
    step = make_step(ctx)
    signum = None  # the signal that stops the run (under torchrun: any rank's, as agreed at a sync point)
    model.train()
    try:
        while True:
            timed = True  # whether the clocks are agreed at this iteration (always, in a single process)
            if not due:
                t0 = time.perf_counter()
                chunk, reset = batches(state["iteration"])
                bits, grad_norm, h = step(to_device(chunk, device), reset, h)
                interval["bits"] += bits  # device tensors: read once per SYNC_STEPS, not per step
                interval["grad_norm"] += grad_norm
                interval["steps"] += 1
                state["iteration"] += 1
                # wait for the device every SYNC_STEPS steps, and before anything that ends the interval, so that
                # the steps' times add up to the real training time (the time waited counts to this step)
                ahead = time.perf_counter() - t0
                sync = device.type == "cpu" or interval["steps"] % SYNC_STEPS == 0 or \
                    (args.print_iters and state["iteration"] % args.print_iters == 0) or \
                    (args.stop_iters and state["iteration"] >= args.stop_iters)
                if world == 1:
                    sync = sync or interrupts.signum is not None or interval["secs"] + ahead >= args.print_time or \
                        state["train_secs"] + ahead >= args.stop_time * 3600
                finite = not sync or math.isfinite(float(interval["bits"]))
                step_secs = time.perf_counter() - t0
                state["train_secs"] += step_secs
                interval["secs"] += step_secs
                if world == 1:
                    signum = interrupts.signum
                elif sync:  # every rank takes rank 0's clocks, and any rank's signal or non-finite loss
                    train_secs, secs, sig, bad = dist.agree(
                        [state["train_secs"] if main else -1, interval["secs"] if main else -1,
                         interrupts.signum or 0, 0 if finite else 1], device, "max")
                    state["train_secs"], interval["secs"] = train_secs, secs
                    signum, finite = int(sig) or None, not bad
                timed = sync or world == 1
                if not finite:
                    raise NonFinite(f"non-finite train NLL by iteration {state['iteration']}")
                progress.step(state, interval, step_secs, samples_per_step, synced=sync)
                interrupts.step_secs = progress.secs_per_it()
                due = (state["iteration"] % args.print_iters == 0) if args.print_iters else \
                    (timed and interval["secs"] >= args.print_time)
            final = stopping(by_time=timed)
            state["wall_secs"] = time.time() - wall_start
            if due or final:
                interval, h_all = shared(ctx, interval, h)
                outcome, error = None, None
                if main:
                    try:
                        final = end_interval(ctx, state, interval, h_all, samples_per_step, final)
                    except Interrupted as e:  # a signal during the evaluation or the samples
                        outcome = ("saved" if e.saved else "unsaved", interrupts.signum)
                    except (NonFinite, WriteError) as e:
                        if world == 1:
                            raise
                        outcome, error = ("error", None), e
                if world > 1:  # rank 0 alone ended the interval: every rank goes on from its outcome and state
                    outcome, final, shared_state = dist.share((outcome, final, state))
                    state.update(shared_state)
                    if outcome and outcome[0] == "error":
                        if main:
                            raise error
                        return 1
                if outcome and outcome[0] == "saved":  # the checkpoint is saved; resuming writes the samples
                    return interrupted(ctx, state, new_interval(), h_all, outcome[1])
                if outcome:  # resuming does the whole interval end again
                    return interrupted(ctx, dict(state, interval_due=True), interval, h_all, outcome[1])
                interval, due = new_interval(), False
                model.train()
            if final:
                if main:
                    log("the run's row for experiments.md (python -m lib.report compares several):\n" +
                        report([ctx["run_dir"]]))
                return 0
            if signum is not None:
                interval, h_all = shared(ctx, interval, h)
                return interrupted(ctx, state, interval, h_all, signum)
    except NonFinite as e:
        saved = checkpoint_paths(ctx["run_dir"])
        log(f"error: {e}; stopped without saving it. " + (f"The last good checkpoint is {saved[-1]}" if saved
                                                            else "No checkpoint had been saved yet."))
        return 1
    finally:
        progress.close()


def to_device(chunk, device):
    """A batch to the device; on CUDA from pinned memory, so that the copy does not wait for the queued steps."""
    if device.type == "cuda" and not chunk.is_cuda:
        chunk = chunk.pin_memory()
    return chunk.to(device, non_blocking=True)


def make_step(ctx):
    """step(chunk, reset, h) -> (bits, grad_norm, h): train_step, or with --cuda_graph its CUDA graphs (captured at
    the first call, lib/cuda_graph.py)."""
    args, model, optimizer = ctx["args"], ctx["model"], ctx["optimizer"]

    def eager(chunk, reset, h):
        return train_step(model, optimizer, chunk, reset, h, args.grad_clip, args.precision, ctx["net"])
    if not args.cuda_graph:
        return eager
    from lib.cuda_graph import captured_at_first_call  # it imports this module
    return captured_at_first_call(model, optimizer, args.grad_clip, args.precision)


def shared(ctx, interval, h):
    """The interval's sums as floats (waiting for the device) and h, for saving: under torchrun, the mean of the
    ranks' train NLL and grad norm (equal on every rank: DDP averages the gradients), and every rank's h."""
    interval = {k: float(v) if k != "steps" else int(v) for k, v in interval.items()}
    if ctx["world"] == 1:
        return interval, h
    bits, grad_norm = dist.agree([interval["bits"], interval["grad_norm"]], ctx["device"])
    interval.update(bits=bits / ctx["world"], grad_norm=grad_norm / ctx["world"])
    return interval, None if h is None else dist.gather_rows(h)


def patience_reached(args, state):
    return bool(args.patience) and state.get("since_best", 0) >= args.patience


class Progress:
    """How far the run is toward the budget that stops it: iterations when --stop_iters is given, else training
    time. On a terminal a tqdm bar; otherwise (a file, nohup) a plain line every PROGRESS_SECS. Once, after the
    first few steps, a line with the measured speed and when the first interval and the end will come."""

    def __init__(self, args, state, log, device, shown=True):
        self.args, self.log, self.device = args, log, device
        self.by_iters = bool(args.stop_iters)
        disable = None if shown else True  # None: shown on a terminal
        if self.by_iters:
            self.bar = tqdm(total=args.stop_iters, initial=state["iteration"], unit="it", disable=disable,
                            dynamic_ncols=True)
        else:
            self.bar = tqdm(total=round(args.stop_time * 3600), initial=round(state["train_secs"]), disable=disable,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training "
                                                           "[{elapsed}<{remaining}{postfix}]")
        self.timing, self.timed_steps, self.timed_secs, self.last_line = False, 0, 0.0, time.time()
        self.spoken, self.rechecked = None, False

    def step(self, state, interval, step_secs, samples_per_step, synced=True):
        """synced: whether the loop waited for the device at this step. Steps are timed from the first such wait
        (on the CPU, every step; the first step warms up: allocations, kernels), and the speed line comes at a
        wait, so that on CUDA it counts the steps' work, not only their launches."""
        if self.timing:
            self.timed_secs += step_secs
            self.timed_steps += 1
        self.timing = self.timing or synced
        secs_per_it = self.timed_secs / max(1, self.timed_steps)
        if not self.spoken and synced and self.timed_steps >= SPEED_STEPS:
            self.spoken = (self.timed_steps, self.timed_secs, secs_per_it)
            self.speed_line(state, interval, secs_per_it, samples_per_step)
        elif self.spoken and not self.rechecked and synced and self.timed_steps >= self.spoken[0] + RECHECK_STEPS:
            # the first steps can be far slower than the rest (allocations, caches, compilation): said again if so
            self.rechecked = True
            steps, secs, said = self.spoken
            recent = (self.timed_secs - secs) / (self.timed_steps - steps)
            if not 1 / 1.5 < recent / said < 1.5:
                self.speed_line(state, interval, recent, samples_per_step,
                                f"speed over the last {self.timed_steps - steps} steps (the first were "
                                f"{said / recent:.1f}x {'slower' if said > recent else 'faster'})")
        self.bar.update(1 if self.by_iters else step_secs)
        if synced and not self.bar.disable:  # the loop has just waited for the device: reading the sum is free
            self.bar.set_postfix(bits=f"{float(interval['bits']) / interval['steps']:.3f}", refresh=False)
        if self.bar.disable and time.time() - self.last_line >= PROGRESS_SECS:
            self.last_line = time.time()
            left = self.budget_left(state, secs_per_it)
            self.log(f"progress: iteration {state['iteration']:,}, {state['train_secs'] / 3600:.3f} h of training | "
                     f"{secs_per_it:.3f} s per iteration | train {float(interval['bits']) / interval['steps']:.3f} bits/sample "
                     f"since the last interval | {duration(left)} of training left")

    def secs_per_it(self):
        return self.timed_secs / self.timed_steps if self.timed_steps else None

    def budget_left(self, state, secs_per_it):
        left = self.args.stop_time * 3600 - state["train_secs"]
        if self.args.stop_iters:
            left = min(left, (self.args.stop_iters - state["iteration"]) * secs_per_it)
        return max(0.0, left)

    def speed_line(self, state, interval, secs_per_it, samples_per_step, what="speed"):
        args = self.args
        if args.print_iters:
            to_interval = (args.print_iters - state["iteration"] % args.print_iters) % args.print_iters * secs_per_it
        else:
            to_interval = args.print_time - interval["secs"]
        to_interval = min(to_interval, self.budget_left(state, secs_per_it))
        to_end = self.budget_left(state, secs_per_it)
        self.log(f"{what}: {secs_per_it:.3f} s per iteration ({samples_per_step / secs_per_it:,.0f} samples/s); "
                 f"the first interval (valid NLL, checkpoint, samples) in about {duration(to_interval)} of training "
                 f"({clock(to_interval)}), the end of the run in about {duration(to_end)} ({clock(to_end)})")
        if self.device.type == "cpu" and to_interval > 600 and what == "speed":
            self.log("note: this model is sized for a GPU. On a CPU, --preset tiny runs in seconds, and "
                     "--dim 128 --n_rnn 1 --batch_size 16 --print_iters 100 learns something in minutes")

    def close(self):
        self.bar.close()


def duration(secs):
    return f"{secs:.1f} s" if secs < 10 else f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} min" if secs < 7200 else f"{secs / 3600:.1f} h"


def clock(secs_from_now):
    """The wall-clock time in secs_from_now seconds, e.g. 'at 14:05' or 'at 09:30 on Fri 27 Nov'."""
    then = time.localtime(time.time() + secs_from_now)
    same_day = time.strftime("%Y%m%d", then) == time.strftime("%Y%m%d")
    return "at " + time.strftime("%H:%M" if same_day else "%H:%M on %a %d %b", then)


def interrupted(ctx, state, interval, h, signum):
    """Save mid-interval (with the interval's running sums, and whether its end is still to do, so that resuming
    gives the uninterrupted run's metrics) and say how to continue."""
    it, run_dir = state["iteration"], ctx["run_dir"]
    path = os.path.join(run_dir, "checkpoints", f"it{it:07d}.pt")
    interval = {k: float(v) if k != "steps" else int(v) for k, v in interval.items()}  # waits for the device
    if ctx["main"] and (interval["steps"] or state.get("interval_due")):  # else the interval's end saved it
        bad = non_finite(ctx["model"], {"train NLL": interval["bits"], "grad norm": interval["grad_norm"]})
        if bad:
            raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
        save_checkpoint(ctx, dict(state, interval=interval), h, row=None)
    script = SCRIPTS[ctx["model_id"]]
    launcher = "python" if ctx["world"] == 1 else f"torchrun --nproc_per_node {ctx['world']}"
    ctx["log"](f"interrupted at iteration {it}; saved {path}; continue with: {launcher} {script} --resume {run_dir}")
    return 128 + signum


def non_finite(model, values):
    """Names of what is not finite: 'parameters' and the keys of `values` (floats)."""
    bad = [] if all(torch.isfinite(p).all() for p in model.parameters()) else ["parameters"]
    return bad + [name for name, v in values.items() if not math.isfinite(v)]


def train_step(model, optimizer, chunk, reset, h, grad_clip, precision="tf32", net=None):
    """One truncated-BPTT step on a chunk -> (train NLL in bits per sample, grad norm before clipping, h), the
    first two as float64 tensors on the device: reading them would wait for it, so the loop reads their sums
    only every SYNC_STEPS steps. At the first chunk of a clip (reset) the model starts from its learned h0,
    whatever h was. bf16 autocasts the forward pass; the loss, gradients and Adam stay fp32. net: what computes the
    forward pass, when not the model itself (its DistributedDataParallel wrapper under torchrun)."""
    nll, h = backward(model, optimizer, chunk, reset, h, precision, net)
    if reset and net is not None and net is not model:  # under torchrun: DDP leaves h0 to us
        dist.average_initial_state_grads(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return nll.detach().double() / LN2, grad_norm.detach().double(), h.detach().float()


def backward(model, optimizer, chunk, reset, h, precision, net=None):
    """The loss of a chunk and its gradients -> (mean NLL in nats, h). bf16 autocasts the forward pass."""
    if reset:
        h = None
    # no cast cache: each weight is used once per forward, and a CUDA graph's capture needs it off
    with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        nll, aux, h = chunk_loss(model, chunk, h, net)
    optimizer.zero_grad(set_to_none=True)
    (nll + aux).backward()
    return nll, h


def chunk_loss(model, chunk, h, net=None):
    """(mean NLL in nats, auxiliary loss, h) of one chunk."""
    logits, h, aux = (net or model)(chunk, h)
    targets = chunk[:, model.overlap:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)), aux, h


@torch.no_grad()
def evaluate(model, split, batch_size, device, max_clips=0, stop=None):
    """Mean NLL in bits per sample over every predicted sample of the clips (all chunks, in a fixed order).
    stop: a callable checked before each chunk; when it is true, Interrupted is raised."""
    model.eval()
    total, count, h = 0.0, 0, None
    # longer chunks than in training give the same predictions (h is carried), with fewer calls
    eval_len = model.seq_len * max(1, EVAL_CHUNK // model.seq_len)
    for chunk, reset in eval_chunks(split, batch_size, model.seq_len, model.overlap, model.q_levels, eval_len,
                                    max_clips):
        if stop is not None and stop():
            raise Interrupted(saved=False)
        if reset:
            h = None
        chunk = chunk.to(device)
        logits, h, _ = model(chunk, h)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, model.overlap:].reshape(-1),
                                 reduction="sum").item()
        count += logits.shape[0] * logits.shape[1]
    return total / count / LN2


def end_interval(ctx, state, interval, h, samples_per_step, final):
    """Log the interval, evaluate, checkpoint (and best.pt when valid NLL improved), write samples -> whether the
    run ends here (its budget, or --patience). None of this counts as training time.
    Nothing is saved from non-finite values (NonFinite). The checkpoint holds the interval's metrics row and is
    written first: a failed write leaves no row without its checkpoint, and resume puts back a row, best.pt or
    samples that a kill cut off. A signal stops the evaluation or the samples (Interrupted, saying whether the
    checkpoint was written). At the end, test NLL is measured on the last weights and on best.pt's."""
    args, model, splits, log, run_dir = ctx["args"], ctx["model"], ctx["splits"], ctx["log"], ctx["run_dir"]
    it, stop = state["iteration"], ctx["stop"]
    row = {"iteration": it, "train_secs": round(state["train_secs"], 3), "wall_secs": round(state["wall_secs"], 3),
           "epochs": round(it * args.batch_size * ctx["world"] / ctx["chunks_per_epoch"], 4),
           "train_bits": interval["bits"] / interval["steps"],
           "valid_bits": evaluate(model, splits["valid"], args.batch_size, ctx["device"], args.valid_clips, stop),
           "grad_norm": interval["grad_norm"] / interval["steps"],
           "samples_per_sec": round(samples_per_step * interval["steps"] / interval["secs"], 1),
           "rss_mb": rss_mb()}
    bad = non_finite(model, {"train NLL": row["train_bits"], "grad norm": row["grad_norm"],
                             "valid NLL": row["valid_bits"]})
    improved = row["valid_bits"] < state["best_valid"]
    since_best = 0 if improved else state["since_best"] + 1
    final = final or bool(args.patience and since_best >= args.patience)
    row["best_iteration"] = it if improved else state["best_iteration"]
    if not bad and (final or (args.test_on_best and improved)):
        row["test_bits"] = evaluate(model, splits["test"], args.batch_size, ctx["device"], stop=stop)
    if not bad and final:
        row["best_test_bits"] = row["test_bits"] if improved else \
            evaluate(best_model(ctx), splits["test"], args.batch_size, ctx["device"], stop=stop)
    test = f" | test {row['test_bits']:.4f}" if "test_bits" in row else ""
    log(f"iter {it:7d} | epoch {row['epochs']:.2f} | train {row['train_bits']:.4f} | valid {row['valid_bits']:.4f}"
        f"{' *' if improved else ''}{test} bits/sample | grad norm {row['grad_norm']:.3f} | "
        f"{row['samples_per_sec']:,.0f} samples/s | train {state['train_secs'] / 3600:.3f} h, "
        f"wall {state['wall_secs'] / 3600:.3f} h")
    if bad:
        raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
    if final and "best_test_bits" in row:
        log(f"best valid NLL {min(state['best_valid'], row['valid_bits']):.4f} at iteration {row['best_iteration']} "
            f"(checkpoints/best.pt): test {row['best_test_bits']:.4f} bits/sample" +
            (f"; stopped early: no improvement in {since_best} intervals (--patience {args.patience})"
             if args.patience and since_best >= args.patience else ""))
    state.update(best_valid=min(state["best_valid"], row["valid_bits"]), best_iteration=row["best_iteration"],
                 since_best=since_best)
    path = save_checkpoint(ctx, state, h, row)
    if improved:
        write_best(run_dir, path)
    if args.keep_checkpoints:  # best.pt is a copy: what it came from may go
        for old in checkpoint_paths(run_dir)[:-args.keep_checkpoints]:
            os.remove(old)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise WriteError(metrics, e) from None
    if ctx.pop("first_interval", False):
        warn_of_many_passes(ctx, state, interval)
    try:
        write_samples(ctx, it)
    except Interrupted:
        raise Interrupted(saved=True) from None
    plot_curves({os.path.basename(run_dir): read_metrics(run_dir)}, os.path.join(run_dir, "curves.png"))
    gc.collect()  # a closed matplotlib figure's reference cycles otherwise hold ~2.5 MB each until a rare full GC
    return final


def write_best(run_dir, checkpoint):
    """checkpoints/best.pt: a copy of the checkpoint with the best valid NLL so far, written atomically."""
    atomic_write(os.path.join(run_dir, "checkpoints", "best.pt"), lambda tmp: shutil.copyfile(checkpoint, tmp))


def best_model(ctx):
    """A copy of the model with best.pt's weights (for the end-of-run test NLL)."""
    best = copy.deepcopy(ctx["model"])
    best.load_state_dict(torch.load(os.path.join(ctx["run_dir"], "checkpoints", "best.pt"), map_location="cpu",
                                    weights_only=False)["model"])
    return best


def warn_of_many_passes(ctx, state, interval):
    """Once, at the first interval: the passes over the train split that the budget means at the measured speed."""
    args = ctx["args"]
    secs_per_it = interval["secs"] / interval["steps"]
    iters = (args.stop_time * 3600 - state["train_secs"]) / secs_per_it
    if args.stop_iters:
        iters = min(iters, args.stop_iters - state["iteration"])
    passes = (state["iteration"] + iters) * args.batch_size * ctx["world"] / ctx["chunks_per_epoch"]
    if passes > PASSES_WARNING:
        ctx["log"](f"warning: at this speed the run's budget passes over the train split about {passes:,.0f} times; "
                   f"expect it to overfit (checkpoints/best.pt keeps the best valid NLL; --patience stops early). "
                   f"README's \"Bigger data\" shows how to train on more audio")


def sample_paths(ctx, it):
    return [os.path.join(ctx["run_dir"], "samples", f"it{it:07d}_{k}.wav") for k in range(ctx["args"].n_samples)]


def write_samples(ctx, it):
    """--n_samples sequences from the model, with the same noise at every interval (samples differ only by the
    weights)."""
    args, paths = ctx["args"], sample_paths(ctx, it)
    if not paths:
        return
    n = max(1, round(args.sample_secs * ctx["sample_rate"]))
    seqs = generate(ctx["model"], args.n_samples, n, seed=args.seed, stop=ctx.get("stop")).cpu()
    audio = dequantize(seqs, args.q_levels, args.qtype).numpy()
    try:
        os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    except OSError as e:
        raise WriteError(os.path.dirname(paths[0]), e) from None
    for path, a in zip(paths, audio):
        write_wav(path, a, ctx["sample_rate"])


def save_checkpoint(ctx, state, h, row):
    """Everything needed to continue exactly, and the interval's metrics row (None when saved mid-interval);
    written to a temporary file and renamed (lib.atomic_write: a kill or a full disk never leaves a partial one)."""
    folder = os.path.join(ctx["run_dir"], "checkpoints")
    path = os.path.join(folder, f"it{state['iteration']:07d}.pt")
    ckpt = {"model_id": ctx["model_id"], "settings": vars(ctx["args"]), "sample_rate": ctx["sample_rate"],
            "model": ctx["model"].state_dict(), "optimizer": ctx["optimizer"].state_dict(), "state": dict(state),
            "row": row, "h": None if h is None else h.cpu()}  # no global RNG state: nothing draws from it
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WriteError(folder, e) from None
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return path


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def rss_mb():
    """Resident memory of this process now (MB), from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, AttributeError):
        return None


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


class Logger:
    """print() that also appends to the run's log.txt."""

    def __init__(self, path):
        self.path = path  # None: print nothing (the other ranks under torchrun)

    def __call__(self, message):
        if self.path is None:
            return
        tqdm.write(message)
        try:
            with open(self.path, "a") as f:
                f.write(message + "\n")
        except OSError as e:
            raise WriteError(self.path, e) from None
