"""Benchmarks, measured side by side in one process: python bench.py generate|train [flags]

    python bench.py generate --model twotier --dim 256 --frame_size 2 --n_rnn 3 --batch 1 64
    python bench.py generate --model twotier --dim 1024 --frame_size 2 --batch 64
    python bench.py train --model twotier --frame_size 2 --precision tf32 bf16    # the default model

train: real training steps (lib.step.train_step, on the default data, after --warmup steps) of the model the
flags describe, at each --precision: trained samples/s, MFLOP per trained sample (forward plus backward, from
the layer shapes), the FLOP/s achieved, the matmul rate of this machine at that precision measured here, and
their ratio; also the plain step it replaced (a host round-trip for the loss and the grad norm every step,
one norm per parameter, Adam without fusing, the batch gathered on the CPU and copied), timed in turns with it;
on CUDA the other steps gather their batches on the GPU, as training does. One JSON line per measurement at the end.

For each batch size: samples/second of the reference sampler and of the fast path (on the CPU: the fast step
compiled with numba, below batch 16 only as it is slow beyond, on numpy and on torch; on CUDA: with and
without CUDA graphs), their ratio, the fast path's FLOPs per generated sample, the matmul FLOP/s of this
machine measured here, and achieved / FLOP-bound limit. At batch 1 the limit is reading the weights instead:
it prints the bytes read per sample, the rate at which they are read, and the read-bound limit: the rate at
which torch's thread count of threads read arrays of the model's size here, over the bytes per sample.
Weights are random: speed does not depend on them.
Each figure is the best of --repeats timings, the paths timed in turns (this is a shared machine). Nothing
here is asserted; the numbers go in notes/performance.md, dated.
"""
if __name__ == "__main__":  # before the slow imports: a Ctrl-C is one line, never a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted; the measurements printed above are complete")

import argparse
import importlib
import json
import math
import threading
import time

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import three_tier
import two_tier
from lib import DEFAULT_DATA, MODELS
from lib.cli import ArgumentParser
from lib.data import ChunkBatches, load_splits
from lib.sample import BACKENDS, default_backend, generate
from lib.settings import PRECISIONS, choose_device
from lib.step import chunk_loss, make_optimizer, set_precision, train_step


def flops_per_sample(model):
    """Multiply-adds x 2 of the fast path per generated sample."""
    if isinstance(model, two_tier.TwoTier):
        fs, gru = model.frame_size, model.frame_rnn.rnn.gru
        dim, q = gru.hidden_size, model.q_levels
        per_frame = sum(2 * 3 * dim * ((fs if k == 0 else dim) + dim) for k in range(gru.num_layers))
        per_frame += 2 * dim * fs * dim  # conditioning projection
        per_sample = fs * dim + 2 * 2 * dim * dim + 2 * dim * q  # table lookup-sum, 2 hidden, output
        return per_frame / fs + per_sample
    if isinstance(model, three_tier.ThreeTier):
        return three_tier_flops(model)
    gru = model.rnn.gru
    dim, n_in = gru.hidden_size, gru.input_size
    return sum(2 * 3 * dim * ((n_in if k == 0 else dim) + dim) for k in range(gru.num_layers)) + 2 * dim * model.q_levels


def gru_dim(model):
    return model.frame_rnn.rnn.gru.hidden_size


def three_tier_flops(model):
    """Multiply-adds x 2 per sample of the three-tier model's fast path: the big tier once per big frame, the
    frame tier once per frame, the MLP (first layer as table lookups) once per sample."""
    bfs, fs, q, dim = model.big_frame_size, model.frame_size, model.q_levels, gru_dim(model)
    layers = model.big_rnn.rnn.gru.num_layers
    big = sum(2 * 3 * dim * ((bfs if k == 0 else dim) + dim) for k in range(layers)) + 2 * dim * (bfs // fs) * dim
    frame = 2 * fs * dim + sum(2 * 3 * dim * (dim + dim) for k in range(layers)) + 2 * dim * fs * dim
    return big / bfs + frame / fs + fs * dim + 2 * 2 * dim * dim + 2 * dim * q


def training_flops(model):
    """FLOPs of one trained sample, forward plus backward (taken as twice the forward), from the layer shapes."""
    def gru(layer_inputs, dim):
        return sum(2 * 3 * dim * (n_in + dim) for n_in in layer_inputs)
    if isinstance(model, two_tier.TwoTier):
        fs, rnn = model.frame_size, model.frame_rnn.rnn.gru
        dim, q, emb = rnn.hidden_size, model.q_levels, model.sample_mlp.embed.embedding_dim
        per_frame = gru([fs] + [dim] * (rnn.num_layers - 1), dim) + 2 * dim * fs * dim
        per_frame += 2 * dim * fs * q if model.ip_head is not None else 0
        forward = per_frame / fs + 2 * fs * emb * dim + 2 * 2 * dim * dim + 2 * dim * q
    elif isinstance(model, three_tier.ThreeTier):  # the first layer as a product in training
        emb = model.sample_mlp.embed.embedding_dim
        forward = three_tier_flops(model) - model.frame_size * gru_dim(model) + 2 * model.frame_size * emb * gru_dim(model)
    else:
        rnn = model.rnn.gru
        forward = gru([rnn.input_size] + [rnn.hidden_size] * (rnn.num_layers - 1), rnn.hidden_size)
        forward += 2 * rnn.hidden_size * model.q_levels
    return 3 * forward


def matmul_flops(device, n=2048, dtype=torch.float32):
    """FLOP/s of a large square float32 matmul on this device (the FLOP-bound limit's numerator): the best of
    the calls in a second, as the samples/s are the best of --repeats timings (an average here once put a
    disturbed second's rate under the fast path's, for achieved / limit 1.11)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < 1.0:
        t = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def read_bandwidth(nbytes, threads):
    """Bytes/s at which `threads` threads together read float32 arrays of nbytes in all, each its own share
    (numpy's max, which releases the GIL and is bound by reading): the best in a second of rounds of 1 GB in
    all (a read-bound limit, as matmul_flops is a FLOP-bound one). At batch 1 the fast path is bound by
    reading its weights, not by FLOPs, and the compiled step reads them on as many threads as torch has."""
    arrays = [np.ones(nbytes // 4 // threads, np.float32) for _ in range(threads)]
    reads = max(1, 10 ** 9 // nbytes)
    barrier = threading.Barrier(threads + 1)

    def read(a):
        barrier.wait()
        for _ in range(reads):
            a.max()
        barrier.wait()
    best, begin = float("inf"), time.perf_counter()
    while time.perf_counter() - begin < 1.0:
        readers = [threading.Thread(target=read, args=(a,)) for a in arrays]
        for r in readers:
            r.start()
        barrier.wait()
        start = time.perf_counter()
        barrier.wait()
        best = min(best, time.perf_counter() - start)
        for r in readers:
            r.join()
    return reads * sum(a.nbytes for a in arrays) / best


def build(args, seq_len):
    """The model as its script builds it (its build_model, its defaults), with this benchmark's flags over them."""
    script = importlib.import_module(MODELS[args.model])
    parser = argparse.ArgumentParser()
    script.add_model_args(parser)
    flags = vars(parser.parse_args([]))
    flags.update({k: getattr(args, k) for k in flags if getattr(args, k, None) is not None})
    flags.update(q_levels=args.q_levels, seq_len=seq_len)
    return script.build_model(argparse.Namespace(**flags))


def samples_per_sec(model, batch, paths, repeats):
    """{name: samples/s} of each path (name -> (length, generate() keywords)): the best of `repeats` timings,
    taken in turns, so that a slow spell of this shared machine falls on every path alike. A line as each round
    of each path is timed: the reference alone can take minutes on a CPU."""
    best = {}
    for name, (length, kw) in paths.items():
        print(f"  batch {batch}: warming up {name} (the first use of a compiled step may compile it)", flush=True)
        generate(model, batch, min(length, 64), **kw)  # warm-up
        best[name] = float("inf")
    for r in range(repeats):
        for name, (length, kw) in paths.items():
            start = time.perf_counter()
            generate(model, batch, length, **kw).cpu()
            secs = time.perf_counter() - start
            best[name] = min(best[name], secs / (batch * length))
            print(f"  batch {batch}: {name}, round {r + 1} of {repeats}: {batch * length / secs:,.0f} samples/s "
                  f"({secs:.1f} s)", flush=True)
    return {name: 1 / secs for name, secs in best.items()}


def describe(args):
    """The model the flags describe, in words, for a benchmark's first line."""
    if args.model == "twotier":
        return f"two-tier dim {args.dim}, frame size {args.frame_size}, {args.n_rnn} GRUs"
    if args.model == "threetier":
        return f"three-tier dim {args.dim}, big frames {args.big_frame_size}, frames {args.frame_size}, " \
               f"{args.n_rnn} GRUs per tier"
    return f"baseline dim {args.dim}, {args.n_rnn} GRUs, --input {args.input}"


def bench_generate(args):
    device = choose_device(args.device)
    torch.manual_seed(0)
    model = build(args, 16 * args.big_frame_size)  # the chunk: no matter here
    config = describe(args)
    model.to(device).eval()
    flops = flops_per_sample(model)
    peak = matmul_flops(device)
    blas = [f"{pool['internal_api']} {pool['num_threads']} threads" for pool in threadpool_info()
            if pool["user_api"] == "blas"]
    print(f"{config} on {device}, torch {torch.__version__} {torch.get_num_threads()} threads, "
          f"numpy {np.__version__} ({', '.join(blas)})")
    print(f"fast path: {flops / 1e6:.2f} MFLOP per generated sample; matmul here: {peak / 1e9:.1f} GFLOP/s "
          f"(2048^3 float32) -> FLOP-bound limit {peak / flops:,.0f} samples/s")
    weight_bytes = 2 * flops  # float32 weights read per sample at batch 1: one per multiply-add
    read_limit = None
    if device.type == "cpu":  # batch 1 is bound by reading the weights: about the model's parameters
        model_bytes, threads = sum(p.numel() * 4 for p in model.parameters()), torch.get_num_threads()
        rate = read_bandwidth(model_bytes, threads)
        read_limit = rate / weight_bytes
        print(f"at batch 1 the fast path reads {weight_bytes / 1e6:.2f} MB of weights per sample; {threads} threads "
              f"read arrays of the model's size ({model_bytes / 1e6:.2f} MB) at {rate / 1e9:.1f} GB/s here "
              f"-> read-bound limit {read_limit:,.0f} samples/s")
    print("* = the path generate.py takes at this batch size (on CUDA: the CUDA graphs)")
    for batch in args.batch:
        length = max(1, round(args.secs * args.sample_rate))
        backends = ("torch",) if device.type != "cpu" else BACKENDS if batch < 16 else ("numpy", "torch")
        paths = {"reference": (max(1, length // args.ref_fraction), dict(fast=False))}
        paths.update({backend: (length, dict(backend=backend, cuda_graph=False)) for backend in backends})
        if device.type == "cuda":
            paths["CUDA graphs"] = (length, dict(cuda_graph=True))
        speed = samples_per_sec(model, batch, paths, args.repeats)
        ref, chosen = speed["reference"], default_backend(model, batch)
        line = f"batch {batch:4d}: reference {ref:10,.0f} samples/s"
        for backend in backends:
            line += (f" | fast{'*' if backend == chosen else ''} {backend} {speed[backend]:10,.0f} samples/s "
                     f"({speed[backend] / ref:5.1f}x)")
        default = speed[chosen]
        if device.type == "cuda":
            graphed = speed["CUDA graphs"]
            line += f" | fast + CUDA graphs {graphed:10,.0f} samples/s ({graphed / ref:5.1f}x)"
        line += f" | *: {default / args.sample_rate:6.2f}x real time at {args.sample_rate} Hz"
        line += (f", achieved / limit {default * flops / peak:.2f}, "
                 f"weights read at {default * weight_bytes / batch / 1e9:.1f} GB/s")
        if batch == 1 and read_limit:
            line += f", achieved / read-bound limit {default / read_limit:.2f}"
        print(line, flush=True)


def flop_rate(x):
    return f"{x / 1e12:.2f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def plain_step(model, optimizer, chunk, reset, h, grad_clip, precision):
    """The training step before the sync-free one, kept here to measure against: it reads the loss and the grad
    norm every step (a host round-trip) and takes one norm per parameter; its optimizer is plain Adam."""
    with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        nll, aux, h = chunk_loss(model, chunk, None if reset else h)
    optimizer.zero_grad(set_to_none=True)
    (nll + aux).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    optimizer.step()
    return nll.item() / math.log(2), grad_norm.item(), h.detach().float()


def step_kinds(args, model, device, precision):
    """{name: (step function, its optimizer)}: the kinds of training step to time side by side."""
    steps = {} if args.quick else {"plain": (plain_step, torch.optim.Adam(model.parameters(), lr=1e-4))}
    steps["sync-free"] = (train_step, make_optimizer(model, 1e-4))
    if args.model == "twotier":  # the same step with the MLP's first layer as per-position tables
        steps["tables"] = (train_step, make_optimizer(model, 1e-4))
    if device.type == "cuda":  # the sync-free step captured as CUDA graphs (lib/cuda_graph.py)
        from lib.cuda_graph import captured_at_first_call
        opt = make_optimizer(model, 1e-4, capturable=True)
        graphed = captured_at_first_call(model, opt, 1.0, precision)
        steps["graphed"] = (lambda model, opt, chunk, reset, h, *_: graphed(chunk, reset, h), opt)
    return steps


def time_steps(args, model, steps, batches, device, precision):
    """{kind: seconds per step}, the best of --repeats rounds of --steps, the kinds in turns; the first round
    warms up (allocations, kernel choices). batches: {'plain': the plain step's, 'other': the others'}."""
    best, it = {k: float("inf") for k in steps}, 0
    for repeat in range(args.repeats + 1):
        for kind, (step, opt) in steps.items():
            if args.model == "twotier":
                model.sample_mlp.use_tables = kind == "tables"
            h = None
            start = time.perf_counter()
            for _ in range(args.warmup if repeat == 0 else args.steps):
                chunk, reset = batches["plain" if kind == "plain" else "other"](it)
                it += 1
                _, _, h = step(model, opt, chunk.to(device, non_blocking=True), reset, h, 1.0, precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                best[kind] = min(best[kind], (time.perf_counter() - start) / args.steps)
    return best


def bench_train(args):
    device = choose_device(args.device)
    torch.manual_seed(0)
    default_len = {"twotier": 64 * args.frame_size, "threetier": 64 * args.big_frame_size, "baseline": 128}
    model = build(args, args.seq_len or default_len[args.model])
    config = describe(args) + (f", {model.seq_len // args.frame_size} frames" if args.model == "twotier" else
                               f", seq_len {model.seq_len}")
    model.to(device).train()
    splits, _ = load_splits(DEFAULT_DATA)
    train = splits["train"]
    train.set_quantization(args.q_levels, "linear")
    host_batches = ChunkBatches(train, args.batch_size, model.seq_len, model.overlap, args.q_levels, seed=0)
    batches = host_batches  # the plain step's: gathered on the CPU and copied; the others' as training's, on CUDA
    if device.type == "cuda":  # gathered from the levels held on the GPU
        batches = ChunkBatches(train.on_device(device, args.q_levels), args.batch_size, model.seq_len,
                               model.overlap, args.q_levels, seed=0)
    flops, per_step = training_flops(model), args.batch_size * model.seq_len
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{config}, batch {args.batch_size} x {model.seq_len} samples, on {device} ({name}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads; {flops / 1e6:.1f} MFLOP per trained sample "
          f"(forward + backward)")
    results = []
    for precision in args.precision:
        if precision == "bf16" and device.type != "cuda":
            print("bf16: skipped (CUDA only)")
            continue
        set_precision(precision)
        peak = matmul_flops(device, 4096 if device.type == "cuda" else 2048,
                            torch.bfloat16 if precision == "bf16" else torch.float32)
        steps = step_kinds(args, model, device, precision)
        best = time_steps(args, model, steps, {"plain": host_batches, "other": batches}, device, precision)
        for kind, secs in best.items():
            rate = per_step / secs
            # the tables step does fewer FLOPs than the product it replaces: the plain model's FLOPs at its rate are
            # an effective rate, which may exceed what the card can do, so it is never called a fraction of it
            done = kind != "tables"
            results.append(dict(model=args.model, config=config, device=name, precision=precision, step=kind,
                                batch_size=args.batch_size, seq_len=model.seq_len, samples_per_sec=round(rate),
                                mflop_per_sample=round(flops / 1e6, 2),
                                **{"achieved_tflops" if done else "effective_tflops": round(rate * flops / 1e12, 3)},
                                matmul_tflops=round(peak / 1e12, 2),
                                fraction_of_matmul=round(rate * flops / peak, 3) if done else None))
            print(f"{precision:4s} {kind:9s} step: {secs * 1e3:8.2f} ms, {rate:12,.0f} samples/s, " +
                  (f"{flop_rate(rate * flops)} = {rate * flops / peak:.3f} of the matmul rate here "
                   f"({flop_rate(peak)} at {precision})" if done else
                   f"effective {flop_rate(rate * flops)} (the products' FLOPs at this rate; the tables do fewer)") +
                  (f"; {best['plain'] / secs:.2f}x the plain step" if kind != "plain" and "plain" in best else "") +
                  (f", {best['sync-free'] / secs:.2f}x sync-free" if kind == "tables" else ""), flush=True)
    for r in results:
        print(json.dumps(r))


FULL = dict(batch_size=128, steps=20, warmup=5, repeats=3, secs=0.5)
QUICK_CPU = dict(batch_size=32, steps=2, warmup=1, repeats=1, secs=0.05)  # the default model: a minute or two


def fill_defaults(args, device):
    """On the CPU both answer in a minute or two unless --full (a training step of the default model at batch 128
    takes about 26 s on one core; its reference sampler makes a few hundred samples a second): fewer, smaller
    steps, the plain step skipped, a twentieth of a second of audio, one round; it says so."""
    args.quick = device.type == "cpu" and not args.full
    chosen = QUICK_CPU if args.quick else FULL
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.what == "train":
        print(f"quick CPU run: batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, best of "
              f"{args.repeats}; the plain step skipped. --full for the whole sweep ("
              + ", ".join(f"--{k} {FULL[k]}" for k in ("batch_size", "steps", "warmup", "repeats")) +
              ", every step kind)", flush=True)
    if args.quick and args.what == "generate":
        print(f"quick CPU run: {args.secs:g} s of audio per measurement, best of {args.repeats}. --full for "
              f"--secs {FULL['secs']} --repeats {FULL['repeats']} (several minutes for the default model)", flush=True)


def build_parser():
    p = ArgumentParser(prog="python bench.py", description=__doc__)
    p.add_argument("what", choices=["generate", "train"], help="what to measure")
    p.add_argument("--model", default="twotier", choices=sorted(MODELS), help="which model")
    p.add_argument("--dim", type=int, default=1024, help="width of the GRUs (and of the two-tier's MLP)")
    p.add_argument("--frame_size", type=int, default=2, help="frame size of the two- and three-tier models (samples)")
    p.add_argument("--big_frame_size", type=int, default=8, help="the three-tier model's big frame size (samples)")
    p.add_argument("--n_rnn", type=int, default=3, help="stacked GRUs")
    p.add_argument("--emb_size", type=int, default=256, help="embedding size")
    p.add_argument("--input", default="reals", choices=["reals", "embed"], help="the baseline's input")
    p.add_argument("--q_levels", type=int, default=256, help="quantization levels")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="generate: batch sizes to measure")
    p.add_argument("--batch_size", type=int, default=None, help="train: clips per batch (default: 128; 32 in the "
                   "quick CPU run)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="train: samples per chunk (default: 64 frames for the two-tier model, 128 for the baseline)")
    p.add_argument("--precision", nargs="+", default=["tf32"], choices=PRECISIONS, help="train: precisions to measure")
    p.add_argument("--steps", type=int, default=None, help="train: timed steps per measurement (default: 20; 2 in "
                   "the quick CPU run)")
    p.add_argument("--warmup", type=int, default=None, help="train: steps before timing (default: 5; 1 quick)")
    p.add_argument("--secs", type=float, default=None,
                   help="audio generated per measurement (seconds) (default: 0.5; 0.05 in the quick CPU run)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timings per measurement; the best one is reported (default: 3; 1 in the quick CPU run)")
    p.add_argument("--full", action="store_true",
                   help="on the CPU: the whole sweep (train: every step kind; the defaults above) instead of the "
                        "quick run that answers in a minute or two")
    p.add_argument("--ref_fraction", type=int, default=4, help="the reference generates secs / this (it is slow)")
    p.add_argument("--sample_rate", type=int, default=8000, help="for the real-time factor (Hz)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (and so of the compiled step) and of numpy's BLAS (0 = their default)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fill_defaults(args, choose_device(args.device))
    with threadpool_limits(args.threads or None, user_api="blas"):
        (bench_generate if args.what == "generate" else bench_train)(args)


if __name__ == "__main__":
    main()
