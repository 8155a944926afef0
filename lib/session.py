"""One training session set up: the run to continue, the flags and the model; the data (checked against the run's
on resume), the model and Adam on the device, the run folder new or restored (with what a kill left repaired), and
the opening lines of its log."""
import json
import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lib import MODELS, UserError, cache, checkpoint, dist, page, run, warn
from lib.data import ChunkBatches, Segments, hold_on_device, load_splits
from lib.sample import BACKENDS, default_backend, write_samples
from lib.cli import check_torch, script_of
from lib.settings import (SAME_ON_EVERY_NODE, as_run_did, check_same_run, check_settings, choose_device, parse_settings,
                          role, run_tag, run_to_continue)
from lib.step import make_optimizer, set_precision


@dataclass
class Session:
    """What one training session works with (the run's progress itself is `state`, saved in checkpoints)."""
    args: object
    model_id: str
    model: torch.nn.Module
    net: torch.nn.Module  # what the training steps call: the model, or its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    splits: dict
    sample_rate: int
    batches: ChunkBatches
    device: torch.device
    run: run.Run  # the run folder: its layout, record, metrics and lock
    run_id: str  # written into every checkpoint: None for runs made before ids
    log: Callable
    main: bool  # rank 0: the one that evaluates and writes
    clips_per_step: int  # the global batch
    samples_per_step: int
    chunks_per_epoch: int  # one pass over the train split: this many chunks
    stop: threading.Event = None  # set when a signal asked the run to stop (checked inside evaluation and sampling)
    board: object = None  # --tensorboard: lib.board.Board (rank 0 only)
    warned: bool = False
    command: str = ""  # this session's command line, as a person would type it
    stop_checkpoint: str = None  # the checkpoint a stop saved mid-interval that this session resumed from


def start(model_id, parser, build_model, presets, argv):
    """The run to continue (checked: its model, its processes, its history), the flags, the model; then the
    session on its device and run folder -> (session, parameter count, lib.checkpoint.Resumed or None); the
    session is None for --dry_run, which prints the flags instead."""
    check_torch(torch.__version__)
    run_dir, given = run_to_continue(parser, argv)
    resumed = checkpoint.resume(run.Run(run_dir), model_id, dist.world_size()) if run_dir else None
    args = parse_settings(parser, presets, argv, resumed, given)
    device = choose_device(args.device)
    check_settings(args, device)
    if args.run_dir is not None and resumed is None:  # before the data is read: a folder --run_dir may not take is one line now
        run.check_new_run_dir(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tag = None if resumed else args.name or run_tag(parser, presets, argv, args)  # from the flags as given,
    # before derived ones fill in: a new run's folder name
    model = build_model(args)  # checks the model flags and fills derived ones
    if resumed and args.resume is None:  # --run_dir naming a run: its flags, derived ones included, must match
        check_same_run(args, resumed)
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        print(f"{model_id}: {n_params:,} parameters")
        return None, n_params, resumed
    if args.tensorboard:  # before the run folder is made
        from lib.board import check_installed
        check_installed()
    device = dist.join(device)
    if resumed and dist.rank() == 0:
        resumed.run.hold()  # before anything is repaired: one process trains a run at a time
    session = open_session(model_id, args, model, device, tag, resumed)
    session.command = shlex.join(parser.prog.split() + list(sys.argv[1:] if argv is None else argv))  # python x.py
    return session, n_params, resumed


def open_session(model_id, args, model, device, tag, resumed):
    """The data (checked against the run's on resume), the model and optimizer on the device, the run folder (new,
    or the resumed one: lib.checkpoint.Resumed)."""
    resuming = resumed is not None
    if resuming and not os.path.exists(args.data):
        raise UserError(f"the run's data {args.data} is not there: if it moved, resume with --data NEW_PLACE "
                        f"(the data there is checked against the run's)")
    splits, sample_rate = load_splits(args.data, args.clip_secs)  # memory-mapped, quantized per batch
    dist.same_everywhere({"data": f"fingerprint {cache.fingerprint_id(cache.fingerprint(splits))}",
                          "code": f"digest {run.code_digest()}",  # every node's, by content
                          **{f"--{k}": repr(v) for k, v in sorted(vars(args).items())
                             if role(k) in SAME_ON_EVERY_NODE and k != "data"}})
    if resuming:
        check_data(resumed, splits, args.data, args.accept_changed_data)
    for split in splits.values():
        split.set_quantization(args.q_levels, args.qtype, args.zero_dc, args.norm)
    world, main = dist.world_size(), dist.rank() == 0
    batches = ChunkBatches(splits["train"], args.batch_size, model.seq_len, model.overlap, args.q_levels, args.seed,
                           dist.rank(), world)
    for name in ("valid", "test"):
        Segments(splits[name], model.seq_len, f"{name} clips")  # refuses clips shorter than a chunk, now
    distinct = {id(s): s for s in splits.values()}
    if device.type == "cuda" and args.q_levels <= 256 and sum(int(s.lengths.sum()) for s in distinct.values()) < \
            0.25 * torch.cuda.mem_get_info(device)[0]:  # the splits as uint8 levels on the GPU, where they fit
        splits = hold_on_device(splits, device, args.q_levels)
        batches.segments.split = splits["train"]  # the same segments, gathered on the GPU
    set_precision(args.precision)
    model.to(device)
    if resuming:
        folder = resumed.run
    else:
        folder = run.Run(dist.from_rank0((run.make_run_dir(args.run_dir) if args.run_dir is not None else
                                          run.new_run_dir(args.runs_dir, f"{model_id}_{tag}")) if main else None))
    if main and not resuming:
        folder.hold()
    run_id = resumed.record.get("run_id") if resuming else dist.from_rank0(run.new_run_id())
    return Session(args=args, model_id=model_id, model=model, net=dist.wrap(model, device),
                   optimizer=make_optimizer(model, args.lr, capturable=args.cuda_graph_step), splits=splits,
                   sample_rate=sample_rate, batches=batches, device=device, run=folder, run_id=run_id,
                   log=run.Logger(folder.log if main else None), main=main,
                   clips_per_step=world * args.batch_size, samples_per_step=world * args.batch_size * model.seq_len,
                   chunks_per_epoch=len(batches.segments) * batches.chunks_per_clip)


def check_data(resumed, splits, data, accept_changed):
    """On resume: the data must be what the run trained on (by content, wherever it lies now), unless
    accept_changed (--accept_changed_data); then the run's fingerprint becomes the new data's, and the change
    is recorded in settings.json (by rank 0, with the session's segment)."""
    saved, folder = resumed.record, resumed.run
    old, new = saved.get("data_fingerprint"), cache.fingerprint(splits)
    if old is None:
        warn(f"{folder} was made before runs recorded their data's fingerprint: the data is not checked")
        return
    change = cache.describe_change(old, new)
    if not change:
        return
    if not accept_changed:
        raise UserError(f"the data in {data} differs from what {folder} was trained on ({change}): "
                        f"resume with its own data, or add --accept_changed_data to train on this")
    warn(f"training on changed data ({change}), as --accept_changed_data asks")
    saved["data_fingerprint"] = new
    saved.setdefault("data_changes", []).append(change)  # written with the session's segment (record_segment)


def begin(session, n_params, resumed):
    """A new run's settings.json, or a resumed run's checkpoint restored and what a kill left repaired; the
    opening lines of the log. -> (state, h)."""
    state = {"iteration": 0, "train_secs": 0.0, "wall_secs": 0.0, "best_valid": float("inf"), "best_iteration": None,
             "since_best": 0, "interval": None}
    if resumed is None:
        write_new_record(session, n_params)
        h = None
    else:
        saved, h = checkpoint.restore(resumed, session.model, session.optimizer, session.batches.rows, session.device,
                                      session.args.cuda_graph_step)
        state.update(saved)
        if resumed.ckpt and resumed.ckpt.get("row") is None and resumed.path != session.run.best:
            session.stop_checkpoint = resumed.path  # superseded by this session's first save: then removed
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    session.log(f"{'resuming' if resumed else 'run'} {session.run.folder} from iteration {state['iteration']}" +
                (f" ({os.path.basename(resumed.path)})" if resumed and resumed.path else "") +
                (f"; restarted by torchrun (restart {restarts}, --max_restarts)" if restarts else ""))
    if resumed and session.main:
        record_segment(session, resumed, state["iteration"])
        repair_folder(session, resumed, state["iteration"])
    if session.args.tensorboard and session.main:
        open_board(session, resumed, state["iteration"])
    log_opening(session, n_params)
    return state, h


def drop_stop_checkpoint(session, saved):
    """Once a newer checkpoint is saved, the one a stop wrote mid-interval, which this session resumed from, is
    superseded (it ends no interval: no metrics row points at it) and removed: each Ctrl-C of the default model
    would otherwise keep 251 MB."""
    old, session.stop_checkpoint = session.stop_checkpoint, None
    if old and old != saved and os.path.exists(old):
        os.remove(old)
        session.log(f"removed {os.path.basename(old)}, the mid-interval checkpoint this session resumed from "
                    f"(superseded by {os.path.basename(saved)})")


def continue_command(session):
    world = dist.world_size()
    return (f"{'python' if world == 1 else f'torchrun --nproc_per_node {world}'} {script_of(session.model_id)} "
            f"--resume {session.run}")


def write_new_record(session, n_params):
    """A new run's settings.json: every flag, and what the run was made with."""
    if not session.main:
        return
    splits = session.splits
    session.run.write_record({
        "model_id": session.model_id, "module": MODELS.get(session.model_id), "run_id": session.run_id,
        "settings": vars(session.args), "parameters": n_params,
        "world_size": dist.world_size(), "sample_rate": session.sample_rate,
        "clips": {k: [v.n_clips, int(v.lengths.sum())] for k, v in splits.items()},
        "data_fingerprint": cache.fingerprint(splits), "device": str(session.device), "command": " ".join(sys.argv),
        "git": run.git_info(), "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                            "numpy": np.__version__}})


def record_segment(session, resumed, iteration):
    """A resumed session in the run's record (settings.json): from which iteration, its command line and the flags
    it changed; the run's flags become this session's, so the record says what the run trained with last (its
    budget, its cadence), and each change since is listed under "segments"."""
    saved = resumed.record
    before = as_run_did(session.model_id, saved["settings"])
    now = {k: v for k, v in vars(session.args).items() if k not in ("resume", "accept_changed_data", "dry_run")}
    changed = {k: [before.get(k), v] for k, v in sorted(now.items()) if before.get(k) != v}
    saved.setdefault("segments", []).append({"from_iteration": iteration, "command": session.command,
                                              "changed": changed, "unixtime": int(time.time())})
    saved["settings"] = {**before, **now}
    session.run.write_record(saved)


def repair_folder(session, resumed, iteration):
    """What a kill left: temporary files, metrics rows after the checkpoint, a missing row, best.pt, the
    checkpoint's samples, the page."""
    args, folder = session.args, session.run
    folder.remove_temporary_files()
    row = resumed.ckpt.get("row") if resumed.ckpt else None
    checkpoint.repair_record(folder, iteration, row, resumed.path)
    paths = folder.sample_paths(iteration, args.n_samples)
    if row is not None and not all(map(os.path.exists, paths)):
        session.log(f"writing the samples of iteration {iteration}, which a stop had cut off")
        write_samples(session.model, paths, args.sample_secs, session.sample_rate, args,
                      backend=samples_backend(session))
    page.write_run_page(folder, quiet=True)  # a stop may have come before it was rewritten


def open_board(session, resumed, iteration):
    """--tensorboard's event files. On resume they are written anew from the run's record: everything before is
    purged and every interval up to the checkpoint logged from metrics.jsonl and its samples, so that intervals
    trained without the flag, or after the checkpoint, are neither missing nor shown twice."""
    from lib.board import Board  # only with the flag: a run without it never imports tensorboard
    first = not os.path.isdir(session.run.tensorboard)  # the flags text is written once
    session.board = Board(session.run, vars(session.args), None if resumed is None else 1, first)
    for row in session.run.metrics(quiet=True) if resumed else ():
        if row["iteration"] <= iteration:
            session.board.interval(row, session.args.lr, session.run.sample_paths(row["iteration"],
                                                                          session.args.n_samples), session.sample_rate)


def log_opening(session, n_params):
    """The log's opening lines: the model, the device, every flag, the data."""
    args, splits, batches = session.args, session.splits, session.batches
    world, segments, train = dist.world_size(), batches.segments, splits["train"]
    lines = [f"{session.model_id}: {n_params:,} parameters | device {session.device} float32 | torch "
             f"{torch.__version__}" +
             (f" | {torch.get_num_threads()} CPU threads" if session.device.type == "cpu" else "") +
             (f" | {world} processes (torchrun), global batch {batches.batch_size}" if world > 1 else ""),
             "settings: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())),
             f"data {args.data}: {session.sample_rate} Hz, clips train/valid/test {train.n_clips}/"
             f"{splits['valid'].n_clips}/{splits['test'].n_clips} ({train.lengths.sum() / session.sample_rate / 3600:.2f}"
             f" h of training audio, {'on the GPU as levels' if torch.is_tensor(train.pcm) else 'memory-mapped'});"
             f" {len(segments)} train segments of {segments.length} samples, chunks of {session.model.seq_len} "
             f"samples (+{session.model.overlap} overlap), {batches.chunks_per_clip} per segment"]
    if batches.with_replacement:
        lines.append(f"note: {len(segments)} train segments < the batch of {batches.batch_size}: "
                     f"each batch draws segments with replacement")
    session.log("\n".join(lines))


def samples_backend(session):
    """What a training's samples step with: generate.py's choice (lib.sample.default_backend), but on the CPU the
    compiled step's numpy twin instead of the compiled step. So no interval waits 15-30 s for a compile on a fresh
    install, and the samples do not depend on what numba's cache holds (the same seed draws the same samples, a
    resumed run those of the run it continues). For the few sequences of a small model that would take the
    compiled step, numpy was about as fast (notes/performance.md)."""
    backend = default_backend(session.model, session.args.n_samples)
    twin = "numpy" in getattr(session.model, "fast_backends", BACKENDS)  # a model may offer fewer backends
    return "numpy" if backend == "numba" and twin else backend
