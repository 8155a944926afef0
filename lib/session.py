"""One training session set up: the data (checked against the run's on resume), the model and Adam on the device,
the run folder new or restored (with what a kill left repaired), and the opening lines of its log."""
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lib import UserError, cache, dist, page, run
from lib.data import ChunkBatches, Segments, hold_on_device, load_splits
from lib.sample import write_samples
from lib.step import load_optimizer, make_optimizer, set_precision


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
    run_dir: str
    run_id: str  # written into every checkpoint: None for runs made before ids
    log: Callable
    main: bool  # rank 0: the one that evaluates and writes
    clips_per_step: int  # the global batch
    samples_per_step: int
    chunks_per_epoch: int  # one pass over the train split: this many chunks
    stop: Callable = None  # whether a signal asked the run to stop (checked inside evaluation and sampling)
    warned: bool = False


def setup(model_id, args, model, device, tag, resuming):
    """The data (checked against the run's on resume), the model and optimizer on the device, the run folder."""
    if resuming and not os.path.exists(args.data):
        raise UserError(f"the run's data {args.data} is not there: if it moved, resume with --data NEW_PLACE "
                        f"(the data there is checked against the run's)")
    splits, sample_rate = load_splits(args.data, args.clip_secs)  # memory-mapped, quantized per batch
    if resuming:
        run.check_data(args.resume, splits, args.data, args.accept_changed_data)
    for split in splits.values():
        split.quantized(args.q_levels, args.qtype, args.zero_dc, args.norm)
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
    run_dir = args.resume or (run.new_run_dir(args.runs_dir, f"{model_id}_{tag}") if main else None)
    run_dir = dist.share(run_dir)
    if main and not resuming:
        run.hold_run(run_dir)
    run_id = run.read_run_settings(args.resume).get("run_id") if resuming else dist.share(run.new_run_id())
    return Session(args=args, model_id=model_id, model=model, net=dist.wrap(model, device),
                   optimizer=make_optimizer(model, args.lr, capturable=args.cuda_graph_step), splits=splits,
                   sample_rate=sample_rate, batches=batches, device=device, run_dir=run_dir, run_id=run_id,
                   log=run.Logger(os.path.join(run_dir, "log.txt") if main else None), main=main,
                   clips_per_step=world * args.batch_size, samples_per_step=world * args.batch_size * model.seq_len,
                   chunks_per_epoch=len(batches.segments) * batches.chunks_per_clip)


def begin(s, n_params, resumed):
    """A new run's settings.json, or a resumed run's checkpoint restored and what a kill left repaired; the
    opening lines of the log. -> (state, h)."""
    args, splits = s.args, s.splits
    ckpt_path, ckpt = resumed or (None, None)
    state = {"iteration": 0, "train_secs": 0.0, "wall_secs": 0.0, "best_valid": float("inf"), "best_iteration": None,
             "since_best": 0, "interval": None}
    h = None
    if resumed and s.main:
        run.remove_temporary_files(s.run_dir)
    elif s.main:
        run.write_settings(s.run_dir, {
            "model_id": s.model_id, "run_id": s.run_id, "settings": vars(args), "parameters": n_params,
            "world_size": dist.world_size(),            "sample_rate": s.sample_rate, "clips": {k: [v.n_clips, int(v.lengths.sum())] for k, v in splits.items()},
            "data_fingerprint": cache.fingerprint(splits), "device": str(s.device), "command": " ".join(sys.argv),
            "git": run.git_info(), "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                                "numpy": np.__version__}})
    if ckpt is not None:
        s.model.load_state_dict(ckpt["model"])
        load_optimizer(s.optimizer, ckpt["optimizer"], args.cuda_graph_step)
        state.update(ckpt["state"])
        h = None if ckpt["h"] is None else ckpt["h"][:, s.batches.rows].to(s.device)  # this rank's rows
    s.log(f"{'resuming' if resumed else 'run'} {s.run_dir} from iteration {state['iteration']}" +
          (f" ({os.path.basename(ckpt_path)})" if ckpt_path else ""))
    if resumed and s.main:
        row = ckpt.get("row") if ckpt else None
        run.repair(s.run_dir, state["iteration"], row, ckpt_path)
        if row is not None and not all(map(os.path.exists, run.sample_paths(s.run_dir, state["iteration"],
                                                                           args.n_samples))):
            s.log(f"writing the samples of iteration {state['iteration']}, which a stop had cut off")
            write_samples(s.model, run.sample_paths(s.run_dir, state["iteration"], args.n_samples),
                          args.sample_secs, s.sample_rate, args)
        page.write_run_page(s.run_dir, quiet=True)  # a stop may have come before it was rewritten
    world, segments = dist.world_size(), s.batches.segments
    s.log(f"{s.model_id}: {n_params:,} parameters | device {s.device} float32 | torch {torch.__version__}" +
          (f" | {torch.get_num_threads()} CPU threads" if s.device.type == "cpu" else "") +
          (f" | {world} processes (torchrun), global batch {s.batches.batch_size}" if world > 1 else ""))
    s.log("settings: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
    s.log(f"data {args.data}: {s.sample_rate} Hz, clips train/valid/test {splits['train'].n_clips}/"
          f"{splits['valid'].n_clips}/{splits['test'].n_clips} ({splits['train'].lengths.sum() / s.sample_rate / 3600:.2f}"
          f" h of training audio, {'on the GPU as levels' if torch.is_tensor(splits['train'].pcm) else 'memory-mapped'});"
          f" {len(segments)} train segments of {segments.length} samples, chunks of {s.model.seq_len} samples "
          f"(+{s.model.overlap} overlap), {s.batches.chunks_per_clip} per segment")
    if s.batches.with_replacement:
        s.log(f"note: {len(segments)} train segments < the batch of {s.batches.batch_size}: "
              f"each batch draws segments with replacement")
    return state, h
