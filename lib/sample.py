"""Sampling, shared by every model, generate.py and the training loop's samples (one sampler, not two).

Each sample is argmax(logits / temperature + Gumbel noise), an exact draw from the softmax. The noise comes
from one seeded generator in fixed blocks (`GumbelNoise`), so any way of walking the steps (the plain
reference loop, the fast path a few frames at a time, a CUDA graph) draws the same noise for the same step:
with the same seed, the fast and reference paths give the same samples (tests/test_sample.py checks it).

A model offers two samplers:
  model.generate(n, length, noise, temperature, prime, keep_logits)  the plain, obviously correct reference
  model.fast_sampler(n, temperature, prime, record, backend)          the fast path: an object whose
      step(noise (n, step_len, Q)) -> (n, step_len) levels generates step_len samples (whole frames, about
      STEP_SAMPLES), updating its state in place (so that a call's steps can be captured in a CUDA graph);
      record=True keeps the first sequence's logits of the call in .recorded for the softmax picture.

The fast step is written once against the operations numpy arrays and torch tensors share (@, +=, indexing,
argmax; only the GRU cell is torch's fused one on torch), and once more as compiled loops (lib/kernels.py).
Which one runs (`default_backend`): torch on a GPU. On the CPU a frame is about a hundred small operations,
each about 1 us in numpy and 2-4 us in eager torch, so for a few sequences the compiled step ("numba", one
call per step(), its columns shared among threads) is fastest; for more, torch, where the matrix products
dominate (README has the benchmark). The numpy step is the compiled one's readable twin, and a choice of
--backend. The state lives in torch tensors; numpy and the compiled step work on views of them.
"""
import os
from contextlib import contextmanager

import numpy as np
import torch

from lib import Interrupted, WriteError
from lib.quantize import dequantize

NOISE_BLOCK = 256  # steps of noise drawn at once
STEP_SAMPLES = 32  # samples per fast step() call, at least: the ~20 us of Python around a call is then ~1%
BACKENDS = ("numba", "numpy", "torch")  # what the fast path can step with


class GumbelNoise:
    """Gumbel noise for n sequences over q_levels, drawn in blocks of NOISE_BLOCK steps from one generator."""

    def __init__(self, n, q_levels, seed, device, dtype=torch.float32, xp=torch):
        self.shape, self.dtype, self.xp = (n, NOISE_BLOCK, q_levels), dtype, xp
        self.generator = torch.Generator(device).manual_seed(seed)
        self.block, self.pos = None, NOISE_BLOCK

    def take(self, steps):
        """(n, steps, q_levels) noise for the next `steps` steps."""
        if self.pos + steps <= NOISE_BLOCK:  # the usual case, in the current block
            self.pos += steps
            return self.block[:, self.pos - steps:self.pos]
        parts = []
        while steps:
            if self.pos == NOISE_BLOCK:
                u = torch.rand(self.shape, generator=self.generator, device=self.generator.device)
                gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))
                self.block = as_arrays(gumbel.to(self.dtype), self.xp)
                self.pos = 0
            k = min(steps, NOISE_BLOCK - self.pos)
            parts.append(self.block[:, self.pos:self.pos + k])
            self.pos += k
            steps -= k
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts, 1)


def draw(logits, noise, temperature):
    """One sample per row: argmax of logits / temperature + Gumbel noise (numpy arrays or torch tensors)."""
    if temperature != 1.0:
        logits = logits / temperature
    return (logits + noise).argmax(-1)


def default_backend(model, n):
    """What the fast path steps with for n sequences of `model`: torch on a GPU. On the CPU, the compiled step
    (lib/kernels.py, on torch's thread count) for one sequence, and for fewer than 8 of a model under 2M
    parameters: there one compiled call beats numpy's hundred calls per frame. Otherwise torch, whose matrix
    products were as fast as numpy's or faster at batch 64 (notes/performance.md)."""
    if next(model.parameters()).device.type != "cpu" or "numba" not in getattr(model, "fast_backends", BACKENDS):
        return "torch"  # (a model may offer fewer backends: fast_backends)
    small = sum(p.numel() for p in model.parameters()) < 2_000_000
    if not (n == 1 or (n < 8 and small)):
        return "torch"
    return "numba"


def array_module(backend):
    return torch if backend == "torch" else np


def as_arrays(tensors, xp):
    """Numpy views of a tensor or (nested) list/tuple of CPU tensors if xp is numpy; else the tensors."""
    if xp is torch or tensors is None:
        return tensors
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(as_arrays(t, xp) for t in tensors)
    return tensors.detach().numpy()


@contextmanager
def one_row_threads():
    """Torch on one CPU thread, for a computation on one row (a prime's state): its float32 result then does not
    depend on how many threads a sampler runs on (a product over one row splits its sums by threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def generate(model, n, length, seed=0, temperature=1.0, prime=None, fast=True, cuda_graph=True, record=False,
             progress=False, backend=None, stop=None):
    """(n, length) int levels [and the first sequence's (length, Q) logits if record].
    prime: 1-D int levels that every sequence continues from (they are not part of the output).
    cuda_graph: on CUDA, replay each step() call as a CUDA graph (one launch instead of hundreds; equal to the
    reference in float64, tests/test_cuda.py). Ignored elsewhere.
    backend: what the fast path steps with, one of BACKENDS (default: default_backend(model, n)).
    stop: a threading.Event checked between step() calls (the fast path); when set, lib.Interrupted is raised."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if not fast:
        noise = GumbelNoise(n, model.q_levels, seed, device, dtype)
        out = model.generate(n, length, noise, temperature, prime, keep_logits=record)
        return (out[0], out[1][0]) if record else out
    backend = backend or default_backend(model, n)
    noise = GumbelNoise(n, model.q_levels, seed, device, dtype, array_module(backend))
    sampler = model.fast_sampler(n, temperature, prime, record, backend)
    fl = sampler.step_len  # samples per step() call
    calls = -(-length // fl)
    out = torch.empty(n, calls * fl, dtype=torch.long, device=device)
    recorded = torch.empty(calls * fl, model.q_levels, device=device, dtype=dtype) if record else None
    step = sampler.step
    if cuda_graph and device.type == "cuda" and backend == "torch":
        step = graphed(sampler.step, torch.zeros(n, fl, model.q_levels, device=device, dtype=dtype), sampler)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=calls * fl, unit="sample", unit_scale=True, disable=None, desc=f"{n} x {length} samples")
    torch_threads = torch.get_num_threads()
    if backend == "numba":  # the compiled step has its threads (as many); torch's would spin idle on their cores
        torch.set_num_threads(1)
    try:
        out_xp = as_arrays(out, array_module(backend))  # numpy's indexing costs a tenth of torch's
        for c in range(calls):
            if stop is not None and stop.is_set():
                raise Interrupted()
            out_xp[:, c * fl:(c + 1) * fl] = step(noise.take(fl))
            if record:
                recorded[c * fl:(c + 1) * fl] = sampler.recorded
            if bar is not None:
                bar.update(fl)
    finally:
        sampler.close()
        torch.set_num_threads(torch_threads)
        if bar is not None:
            bar.close()
    return (out[:, :length], recorded[:length]) if record else out[:, :length]


def graphed(step, example_noise, sampler):
    """`step` captured in a CUDA graph: each call copies the noise into a static buffer and replays.
    example_noise only gives the shape: the generator's noise is not used up here."""
    static_noise = example_noise.clone()
    state = sampler.state_copy()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (lazy init, kernel selection) outside the graph
        for _ in range(2):
            step(static_noise)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the process (NCCL's under torchrun, a data loader's) may call CUDA meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = step(static_noise)
    sampler.state_restore(state)  # warm-up and capture must not advance the real state

    def replay(noise):
        static_noise.copy_(noise)
        graph.replay()
        return static_out
    return replay


def write_samples(model, paths, secs, sample_rate, flags, stop=None, backend=None):
    """len(paths) sequences of `secs` seconds as WAV files, drawn with the run's seed (flags.seed: the same noise
    at every interval, so that samples differ only by the weights) and decoded with its quantization."""
    from lib.audio import write_wav  # here: a model file that imports this module loads no file writers
    if not paths:
        return
    seqs = generate(model, len(paths), max(1, round(secs * sample_rate)), seed=flags.seed, stop=stop,
                    backend=backend).cpu()
    audio = dequantize(seqs, flags.q_levels, flags.qtype).numpy()
    try:
        os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    except OSError as e:
        raise WriteError(os.path.dirname(paths[0]), e) from None
    for path, a in zip(paths, audio):
        write_wav(path, a, sample_rate)
