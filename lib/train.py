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
"""
import argparse
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import ArgumentParser, UserError
from lib.audio import write_wav
from lib.data import DEFAULT_DATA, ChunkBatches, eval_chunks, load_audio, quantize_clips
from lib.quantize import NORMS, QTYPES, check_q_levels, dequantize
from lib.report import plot_curves, read_metrics
from lib.sample import generate

SCRIPTS = {"twotier": "two_tier.py", "baseline": "baseline.py"}  # model_id -> the script that trains it
LN2 = math.log(2)
EVAL_CHUNK = 2048  # samples per evaluation chunk (rounded to whole training chunks)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# flags that may change when a run is resumed; every other setting comes from the run
RESUMABLE = {"resume", "stop_time", "stop_iters", "print_time", "print_iters", "device", "valid_clips",
             "n_samples", "sample_secs", "test_on_best", "dry_run"}


def add_training_args(p, presets):
    g = p.add_argument_group("data and quantization")
    g.add_argument("--data", default=DEFAULT_DATA, help="folder made by python -m lib.prepare, or one audio file")
    g.add_argument("--clip_secs", type=float, default=8.0, help="clip length (seconds) when --data is one file")
    g.add_argument("--q_levels", type=int, default=256, help="quantization levels (even, 2..65536)")
    g.add_argument("--qtype", default="linear", choices=QTYPES, help="quantization type")
    g.add_argument("--zero_dc", action="store_true", help="subtract each clip's mean before quantizing")
    g.add_argument("--norm", default="none", choices=NORMS, help="'minmax': stretch each clip to [-1, 1] (original)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=128, help="clips per batch")
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
    g.add_argument("--test_on_best", action="store_true", help="also evaluate test NLL whenever valid NLL improves "
                   "(it is always evaluated at the end)")
    g.add_argument("--n_samples", type=int, default=4, help="sequences generated at every interval")
    g.add_argument("--sample_secs", type=float, default=4.0, help="length of each generated sequence (seconds)")
    g.add_argument("--name", default=None, help="tag in the run name {model}_{tag}_{unixtime} (default from flags)")
    g.add_argument("--runs_dir", default="runs", help="folder that holds the run folders")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    g.add_argument("--preset", default=None, choices=sorted(presets), help="named set of defaults, e.g. tiny")
    g.add_argument("--dry_run", action="store_true", help="print the settings and parameter count, then exit")


def train_main(model_id, doc, add_model_args, build_model, default_tag, presets, argv=None):
    """Entry point of a model script: bad input is one line on stderr and exit status 2."""
    parser = ArgumentParser(description=doc)
    add_model_args(parser)
    add_training_args(parser, presets)
    try:
        sys.exit(train(model_id, parser, build_model, default_tag, presets, argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_settings(model_id, parser, presets, argv):
    """Resolved flags: defaults < preset < command line; on --resume, the run's settings < command line."""
    first, _ = parser.parse_known_args(argv)
    if first.resume is None:
        if first.preset:
            parser.set_defaults(**presets[first.preset])
        return parser.parse_args(argv), None
    ckpt_path = last_checkpoint(first.resume)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt.get("model_id") != model_id:
        raise UserError(f"{first.resume} is a {ckpt.get('model_id')} run, not {model_id}: resume it with "
                        f"{SCRIPTS.get(ckpt.get('model_id'), 'the script that made it')}")
    saved = dict(ckpt["settings"])
    args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))  # explicit flags override saved ones
    changed = [k for k in vars(args) if k not in RESUMABLE and getattr(args, k) != saved.get(k)]
    if changed:
        raise UserError(f"--{changed[0]} cannot change when resuming (the run has {saved.get(changed[0])!r}); "
                        f"only {', '.join('--' + k for k in sorted(RESUMABLE - {'resume'}))} can")
    return args, (ckpt_path, ckpt)


def last_checkpoint(run_dir):
    paths = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "it*.pt")))
    if not os.path.isfile(os.path.join(run_dir, "settings.json")) or not paths:
        raise UserError(f"{run_dir} is not a run folder with checkpoints (no settings.json or "
                        f"checkpoints/it*.pt): pass a folder under runs/")
    return paths[-1]  # names are zero-padded iteration numbers


def check_settings(args):
    check_q_levels(args.q_levels, args.qtype)
    positive = {"batch_size": args.batch_size, "lr": args.lr, "stop_time": args.stop_time,
                "print_time": args.print_time, "clip_secs": args.clip_secs}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name} must be positive (got {value})")
    for name in ("stop_iters", "print_iters", "valid_clips", "n_samples"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.grad_clip < 0 or args.sample_secs < 0:
        raise UserError("--grad_clip and --sample_secs must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")


def train(model_id, parser, build_model, default_tag, presets, argv):
    args, resumed = parse_settings(model_id, parser, presets, argv)
    check_settings(args)
    torch.manual_seed(args.seed)
    model = build_model(args)  # checks the model flags and fills derived ones
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        print(f"{model_id}: {n_params:,} parameters")
        return 0

    audio, sample_rate = load_audio(args.data, args.clip_secs)
    levels = {name: quantize_clips(clips, args.q_levels, args.qtype, args.zero_dc, args.norm)
              for name, clips in audio.items()}
    batches = ChunkBatches(levels["train"], args.batch_size, model.seq_len, model.overlap, args.q_levels, args.seed)
    if levels["valid"].shape[1] < model.seq_len:
        raise UserError(f"valid clips are shorter than one chunk of {model.seq_len} samples")

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    if resumed:
        ckpt_path, ckpt = resumed
        run_dir = args.resume
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
        h = None if ckpt["h"] is None else ckpt["h"].to(device)
        drop_metrics_after(run_dir, state["iteration"])
    else:
        run_dir = new_run_dir(args.runs_dir, f"{model_id}_{args.name or default_tag(args)}")
        state = {"iteration": 0, "train_secs": 0.0, "wall_secs": 0.0, "best_valid": float("inf")}
        h = None
        settings = {"model_id": model_id, "settings": vars(args), "parameters": n_params,
                    "sample_rate": sample_rate, "clips": {k: list(v.shape) for k, v in levels.items()},
                    "device": str(device), "command": " ".join(sys.argv), "git": git_info(),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "numpy": np.__version__}}
        with open(os.path.join(run_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=1)

    log = Logger(os.path.join(run_dir, "log.txt"))
    log(f"{'resuming' if resumed else 'run'} {run_dir} from iteration {state['iteration']}")
    log(f"{model_id}: {n_params:,} parameters | device {device} float32 | torch {torch.__version__}")
    log("settings: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
    log(f"data {args.data}: {sample_rate} Hz, clips train/valid/test {levels['train'].shape[0]}/"
        f"{levels['valid'].shape[0]}/{levels['test'].shape[0]} of {levels['train'].shape[1]} samples; "
        f"chunks of {model.seq_len} samples (+{model.overlap} overlap), {batches.chunks_per_clip} per clip")
    if batches.with_replacement:
        log(f"note: {levels['train'].shape[0]} train clips < --batch_size {args.batch_size}: "
            f"each batch draws clips with replacement")

    ctx = dict(args=args, model=model, optimizer=optimizer, levels=levels, sample_rate=sample_rate,
               run_dir=run_dir, device=device, log=log, model_id=model_id)
    return loop(ctx, batches, state, h)


def loop(ctx, batches, state, h):
    args, model, optimizer, device, log = ctx["args"], ctx["model"], ctx["optimizer"], ctx["device"], ctx["log"]

    def stopping():
        return (args.stop_iters and state["iteration"] >= args.stop_iters) or \
            state["train_secs"] >= args.stop_time * 3600

    if stopping():
        log(f"nothing to do: the run is at iteration {state['iteration']}, {state['train_secs'] / 3600:.3f} h "
            f"(--stop_iters {args.stop_iters}, --stop_time {args.stop_time})")
        return 0
    interval = {"bits": 0.0, "grad_norm": 0.0, "steps": 0, "secs": 0.0}
    wall_start = time.time() - state["wall_secs"]
    bar = tqdm(total=args.stop_iters or None, initial=state["iteration"], unit="it", disable=None,
               dynamic_ncols=True)
    model.train()
    while True:
        t0 = time.perf_counter()
        chunk, reset = batches(state["iteration"])
        bits, grad_norm, h = train_step(model, optimizer, chunk.to(device), reset, h, args.grad_clip)
        step_secs = time.perf_counter() - t0
        state["iteration"] += 1
        state["train_secs"] += step_secs
        if not math.isfinite(bits):
            saved = sorted(glob.glob(os.path.join(ctx["run_dir"], "checkpoints", "it*.pt")))
            log(f"error: non-finite loss at iteration {state['iteration']}; stopped without saving. " +
                (f"The last good checkpoint is {saved[-1]}" if saved else "No checkpoint had been saved yet."))
            return 1
        interval["bits"] += bits
        interval["grad_norm"] += grad_norm
        interval["steps"] += 1
        interval["secs"] += step_secs
        bar.update(1)
        if interval["steps"] % 10 == 1:
            bar.set_postfix(bits=f"{interval['bits'] / interval['steps']:.3f}")

        final = stopping()
        due = (state["iteration"] % args.print_iters == 0) if args.print_iters else \
            (interval["secs"] >= args.print_time)
        if due or final:
            state["wall_secs"] = time.time() - wall_start
            end_interval(ctx, state, interval, h, chunk.numel() - chunk.shape[0] * model.overlap, final)
            interval = {"bits": 0.0, "grad_norm": 0.0, "steps": 0, "secs": 0.0}
            model.train()
        if final:
            bar.close()
            return 0


def train_step(model, optimizer, chunk, reset, h, grad_clip):
    """One truncated-BPTT step on a chunk -> (train NLL in bits per sample, grad norm before clipping, h).
    At the first chunk of a clip (reset) the model starts from its learned h0, whatever h was."""
    if reset:
        h = None
    nll, aux, h = chunk_loss(model, chunk, h)
    optimizer.zero_grad(set_to_none=True)
    (nll + aux).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    optimizer.step()
    # .item() also waits for the GPU, so the caller's timing of the step is its real time
    return nll.item() / LN2, grad_norm.item(), h.detach()


def chunk_loss(model, chunk, h):
    """(mean NLL in nats, auxiliary loss, h) of one chunk."""
    logits, h, aux = model(chunk, h)
    targets = chunk[:, model.overlap:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), aux, h


@torch.no_grad()
def evaluate(model, levels, batch_size, device, max_clips=0):
    """Mean NLL in bits per sample over every predicted sample of the clips (all chunks, in a fixed order)."""
    model.eval()
    if max_clips:
        levels = levels[:max_clips]
    total, count, h = 0.0, 0, None
    # longer chunks than in training give the same predictions (h is carried), with fewer calls
    eval_len = model.seq_len * max(1, EVAL_CHUNK // model.seq_len)
    for chunk, reset in eval_chunks(levels, batch_size, model.seq_len, model.overlap, model.q_levels, eval_len):
        if reset:
            h = None
        chunk = chunk.to(device)
        logits, h, _ = model(chunk, h)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, model.overlap:].reshape(-1),
                                 reduction="sum").item()
        count += logits.shape[0] * logits.shape[1]
    return total / count / LN2


def end_interval(ctx, state, interval, h, samples_per_step, final):
    """Log the interval, evaluate, checkpoint, write samples. None of this counts as training time."""
    args, model, levels, log, run_dir = ctx["args"], ctx["model"], ctx["levels"], ctx["log"], ctx["run_dir"]
    it = state["iteration"]
    row = {"iteration": it, "train_secs": round(state["train_secs"], 3), "wall_secs": round(state["wall_secs"], 3),
           "train_bits": interval["bits"] / interval["steps"],
           "valid_bits": evaluate(model, levels["valid"], args.batch_size, ctx["device"], args.valid_clips),
           "grad_norm": interval["grad_norm"] / interval["steps"],
           "samples_per_sec": round(samples_per_step * interval["steps"] / interval["secs"], 1)}
    improved = row["valid_bits"] < state["best_valid"]
    state["best_valid"] = min(state["best_valid"], row["valid_bits"])
    if final or (args.test_on_best and improved):
        row["test_bits"] = evaluate(model, levels["test"], args.batch_size, ctx["device"])
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    save_checkpoint(ctx, state, h)

    n = max(1, round(args.sample_secs * ctx["sample_rate"]))
    if args.n_samples:  # the same noise at every interval: samples differ only by the weights
        seqs = generate(model, args.n_samples, n, seed=args.seed).cpu()
        audio = dequantize(seqs, args.q_levels, args.qtype).numpy()
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        for k, a in enumerate(audio):
            write_wav(os.path.join(run_dir, "samples", f"it{it:07d}_{k}.wav"), a, ctx["sample_rate"])
    plot_curves({os.path.basename(run_dir): read_metrics(run_dir)}, os.path.join(run_dir, "curves.png"))

    test = f" | test {row['test_bits']:.4f}" if "test_bits" in row else ""
    log(f"iter {it:7d} | train {row['train_bits']:.4f} | valid {row['valid_bits']:.4f}{test} bits/sample | "
        f"grad norm {row['grad_norm']:.3f} | {row['samples_per_sec']:,.0f} samples/s | "
        f"train {state['train_secs'] / 3600:.3f} h, wall {state['wall_secs'] / 3600:.3f} h")


def save_checkpoint(ctx, state, h):
    """Everything needed to continue exactly; written to a temporary file and renamed (a kill never corrupts)."""
    folder = os.path.join(ctx["run_dir"], "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"it{state['iteration']:07d}.pt")
    ckpt = {"model_id": ctx["model_id"], "settings": vars(ctx["args"]), "sample_rate": ctx["sample_rate"],
            "model": ctx["model"].state_dict(), "optimizer": ctx["optimizer"].state_dict(), "state": dict(state),
            "h": None if h is None else h.cpu(), "torch_rng": torch.get_rng_state()}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def drop_metrics_after(run_dir, iteration):
    """On resume, forget rows logged after the checkpoint (a kill between logging and saving)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(run_dir)
    keep = [r for r in rows if r["iteration"] <= iteration]
    if len(keep) < len(rows):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)


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
        self.path = path

    def __call__(self, message):
        tqdm.write(message)
        with open(self.path, "a") as f:
            f.write(message + "\n")
