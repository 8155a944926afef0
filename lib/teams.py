"""The compiled steps of lib/kernels.py on threads: each model's weights split by output columns, one block per
thread (`by_thread`, `stacked_gru`), and the `Team` of threads that steps a kernel on them together (lib/kernels.py's
docstring says how the threads share the work).
"""
import fcntl
import glob
import os
import sys
import tempfile
import threading
from contextlib import contextmanager

import numba
import numpy as np
import torch

from lib.kernels import (LINE, flat_step, flat_worker, thread_range, sync, threetier_step, threetier_worker, twotier_step,
                         twotier_worker)


def start_team(make_team, weights, window, frames, h, temperature, recorded, step_len):
    """A fast sampler's compiled step (make_team: twotier_team ...) on torch's thread count, one window per thread
    -> (the team, thread 0's window: the sampler's window from now on). team.close() stops the threads."""
    windows = window.expand(torch.get_num_threads(), -1, -1).clone()
    recorded = None if recorded is None else recorded.numpy()
    model_id = {twotier_team: "twotier", threetier_team: "threetier", flat_team: "baseline"}[make_team]
    with compile_lock():  # compiled (or loaded from numba's cache) now, by one process at a time
        if not compiled_on_disk(model_id, len(windows)) and not KERNELS[model_id][0].overloads:
            print("compiling the fast sampler for this machine (once: numba keeps it; about 20-30 s)",
                  file=sys.stderr, flush=True)
        team = make_team(weights, windows.numpy(), frames.numpy(), h.numpy(), temperature, recorded, step_len)
    return team, windows[0]


@contextmanager
def compile_lock():
    """Held while this process compiles the steps or loads them from numba's cache (next to lib/kernels.py): a
    second process waits, then loads what the first compiled, instead of compiling again and racing it on
    numba's index (numba issue 10128). Cheap once the steps are loaded."""
    path = os.path.join(cache_folder(), "samplers.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # no writable cache folder: numba compiles into memory only, nothing to share
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cache_folder():
    """Where numba keeps the compiled steps (its own choice: lib/__pycache__, or NUMBA_CACHE_DIR)."""
    try:
        folder = twotier_step._cache._cache_path  # numba's locator, as it decided
    except AttributeError:
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    os.makedirs(folder, exist_ok=True)
    return folder if os.access(folder, os.W_OK) else tempfile.gettempdir()


KERNELS = {"twotier": (twotier_step, twotier_worker), "threetier": (threetier_step, threetier_worker),
           "baseline": (flat_step, flat_worker)}


def compiled_on_disk(model_id, threads):
    """Whether numba's cache holds the model's step (and, for several threads, its worker) compiled from
    today's lib/kernels.py: an index file newer than the source. A guess that errs toward compiling."""
    source = os.path.getmtime(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py"))
    kernels = KERNELS[model_id][:2 if threads > 1 else 1]
    return all(any(os.path.getmtime(p) >= source for p in
                   glob.glob(os.path.join(cache_folder(), f"kernels.{k.py_func.__name__}-*.nbi"))) for k in kernels)


def twotier_team(weights, windows, frames, h, temperature, recorded, step_len):
    """The two-tier model's fast step (FastTwoTierSampler's weights and state, numpy views) compiled, on
    len(windows) threads, each with its own window and its share of every product's columns."""
    reals, gru, cond, table, _, hidden, out, floor = weights
    threads, n, q, dim, fs, dtype = len(windows), len(frames), len(out[1]), table.shape[1], windows.shape[-1] // 2, \
        reals.dtype
    recorded = np.zeros((0, q), dtype) if recorded is None else recorded
    scratch = (np.zeros((n, fs * dim), dtype), np.zeros((len(hidden), n, dim), dtype),
               np.zeros((2, n, q), dtype))  # conditioning, hidden layers, logits: shared by the threads
    split = [thread_ranges(m, threads) for m in (fs * dim, dim, q)]  # thread t's columns of each product
    weights = (reals, *stacked_gru(gru, threads), *(by_thread(p, split[0]) for p in cond), table,
               by_thread(np.stack([w for w, _ in hidden]), split[1]),
               by_thread(np.stack([b for _, b in hidden]), split[1]), *(by_thread(p, split[2]) for p in out), floor)
    return Team(twotier_step, twotier_worker, threads, (n, step_len, q), dtype,
                (windows, frames, h, temperature, recorded, *scratch, *weights))


def threetier_team(weights, windows, frames, h, temperature, recorded, step_len):
    """The three-tier model's fast step (FastThreeTierSampler's weights and state, numpy views) compiled, on
    len(windows) threads."""
    reals, big_gru, above, inp, frame_gru, cond, table, _, hidden, out, floor = weights
    threads, n, q, dim, dtype = len(windows), len(frames), len(out[1]), table.shape[1], reals.dtype
    recorded = np.zeros((0, q), dtype) if recorded is None else recorded
    scratch = (np.zeros((n, len(above[1])), dtype), np.zeros((n, dim), dtype), np.zeros((n, len(cond[1])), dtype),
               np.zeros((len(hidden), n, dim), dtype), np.zeros((2, n, q), dtype))  # shared by the threads
    split = [thread_ranges(m, threads) for m in (len(above[1]), dim, len(cond[1]), q)]  # thread t's columns of each
    weights = (reals, *stacked_gru(big_gru, threads), *(by_thread(p, split[0]) for p in above),
               *(by_thread(p, split[1]) for p in inp), *stacked_gru(frame_gru, threads),
               *(by_thread(p, split[2]) for p in cond), table, by_thread(np.stack([w for w, _ in hidden]), split[1]),
               by_thread(np.stack([b for _, b in hidden]), split[1]), *(by_thread(p, split[3]) for p in out), floor)
    return Team(threetier_step, threetier_worker, threads, (n, step_len, q), dtype,
                (windows, frames, h, temperature, recorded, *scratch, *weights))


def flat_team(weights, lasts, frame, h, temperature, recorded, step_len):
    """The baseline's fast step (FastFlatSampler's weights and state, numpy views) compiled, on len(lasts)
    threads."""
    inputs, gru, out = weights
    threads, n, q = len(lasts), len(frame), len(out[1])
    recorded = np.zeros((0, q), inputs.dtype) if recorded is None else recorded
    logits = np.zeros((2, n, q), inputs.dtype)  # shared by the threads
    return Team(flat_step, flat_worker, threads, (n, step_len, q), inputs.dtype,
                (lasts, frame, h, temperature, recorded, logits, inputs, *stacked_gru(gru, threads),
                 *(by_thread(p, thread_ranges(q, threads)) for p in out)))


class Team:
    """`threads` threads stepping one kernel together. step(noise) puts the call's noise where all read it
    and runs thread 0's part in the caller; threads 1.. run `worker` (the kernel in a loop) from the start,
    each waiting for the next call in the kernel's first barrier. The kernel is called as
    kernel(tid, threads, flags, noise, *args); args must stay the same arrays for the team's life (they are
    updated in place)."""

    def __init__(self, kernel, worker, threads, noise_shape, dtype, args):
        self.kernel, self.threads, self.args = kernel, threads, args
        self.flags = np.zeros((threads + 1) * LINE, np.int64)  # barrier counters, then the stop flag
        self.noise = np.zeros(noise_shape, dtype)
        signature = tuple(numba.typeof(a) for a in (0, threads, self.flags, self.noise, *args))
        kernel.compile(signature)  # here, under start_team's lock, not at the first step
        if threads > 1:  # the worker takes the same arguments as *args
            worker.compile((numba.types.BaseTuple.from_types(signature),))
        sync.compile((numba.typeof(self.flags), numba.int64, numba.int64))
        self.workers = [threading.Thread(target=worker, args=(tid, threads, self.flags, self.noise, *args),
                                         daemon=True) for tid in range(1, threads)]
        for w in self.workers:
            w.start()

    def step(self, noise):
        self.noise[...] = noise
        self.kernel(0, self.threads, self.flags, self.noise, *self.args)

    def close(self):
        """Stop the worker threads (they pass the next start barrier, see the flag and return)."""
        if self.workers:
            self.flags[self.threads * LINE] = 1
            sync(self.flags, 0, self.threads)
            for w in self.workers:
                w.join()
            self.workers = []


def by_thread(w, bounds):
    """w (..., m) -> (threads, ..., width): thread t's columns bounds[t] = (start, end), zero-padded to the
    widest share, so that each thread reads one contiguous block (strided shares of rows ran slower)."""
    out = np.zeros((len(bounds), *w.shape[:-1], max(end - start for start, end in bounds)), w.dtype)
    for t, (start, end) in enumerate(bounds):
        out[t, ..., :end - start] = w[..., start:end]
    return out


def thread_ranges(m, threads):
    return [thread_range(m, t, threads) for t in range(threads)]


def stacked_gru(gru, threads):
    """lib.layers.gru_weights as numpy arrays -> (w_ih0, w_ih, w_hh, b_ih, b_hh) as gru_stack takes them, with
    a leading thread axis: thread t gets the r, z and n columns of its units, one block after the other."""
    d = gru[0][1].shape[0]
    order = np.concatenate([np.arange(g * d + start, g * d + end) for start, end in thread_ranges(d, threads)
                            for g in range(3)])
    bounds = [(3 * start, 3 * end) for start, end in thread_ranges(d, threads)]
    layers = [[by_thread(p[..., order], bounds) for p in layer] for layer in gru]
    w_hh = np.stack([layer[1] for layer in layers], 1)  # (threads, n_rnn, dim, 3 c)
    w_ih = np.stack([layer[0] for layer in layers[1:]], 1) if len(gru) > 1 else w_hh[:, :0]  # layers 1..
    b_ih, b_hh = np.stack([layer[2] for layer in layers], 1), np.stack([layer[3] for layer in layers], 1)
    return layers[0][0], w_ih, w_hh, b_ih, b_hh
