"""The fast path's step compiled for the CPU with numba: one call per step() (about 32 samples), no Python in
between, optionally shared by several threads.

At small batch on the CPU the numpy step spends about half its time in the ~1 us each of its hundred small
calls per frame; compiled, a frame costs little more than reading the weights once. Each function here is
the numpy step of two_tier.py / three_tier.py / baseline.py written as loops over rows; tests/test_sample.py checks that
they give exactly the reference's samples. Weights come in as plain float arrays, transposed as in the
numpy step (in, out), split by output columns into one block per thread (`by_thread`; a leading thread
axis), with the GRU layers stacked (`stacked_gru`): w_ih0 (threads, n_in, 3 c) for layer 0, w_ih (threads,
n_rnn - 1, dim, 3 c) for the others, w_hh (threads, n_rnn, dim, 3 c), b_ih and b_hh (threads, n_rnn, 3 c),
for a thread's c units.

Threads. At batch 1 a frame is bound by reading the weights (6 MB per frame for two-tier dim 256), and one
core reads them at only about 25 GB/s. With T threads (`Team`, lib/teams.py), thread t computes the t-th share of the
output columns of every product, so each reads 1/T of every matrix; a barrier (`sync`, spinning on
counters, then yielding the core) follows each product whose whole output the next one reads. Thread 0 is
the caller; the others wait in the first barrier of the next call. Every thread draws the samples itself
from the same logits and noise, so all agree without passing them around.
Compiled code is cached next to this file (numba's cache=True): the first call per dtype takes seconds.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

LINE = 16  # int64s in 128 bytes: each thread's barrier counter alone on its pair of cache lines
SPINS = 2000  # polls of a barrier (some microseconds) before it yields the core to another thread


@intrinsic
def load_acquire(typingctx, arr, i):
    """arr[i], read atomically: the compiler may not cache it in a register or move reads above it."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return arr.dtype(arr, i), codegen


@intrinsic
def store_release(typingctx, arr, i, value):
    """arr[i] = value, written atomically after every write before it."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return types.void(arr, i, arr.dtype), codegen


@intrinsic
def sched_yield(typingctx):
    """The C library's sched_yield(): let another thread have this core."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True, nogil=True)
def sync(flags, tid, threads):
    """Barrier of `threads` threads: flags[t * LINE] counts the barriers thread t has reached."""
    if threads == 1:
        return
    reached = flags[tid * LINE] + 1
    store_release(flags, tid * LINE, reached)
    for t in range(threads):
        polls = 0
        while load_acquire(flags, t * LINE) < reached:
            polls += 1
            if polls > SPINS:  # the other thread is not running: give it this core
                sched_yield()


def gate_tanh(x):
    """tanh for the GRU gates: libm's in float64 (the reference's, to the last bit in the equality tests); in
    float32 a rational approximation (Eigen's, clamped at +-7.9) that the compiler vectorizes: the gates of 384
    units took 4.4 us against 12.8 with libm's tanhf, and it is at most 4.5 ulp from tanh, 1.1 on average
    (tests/test_sample.py checks it), where tanhf is within 1.4."""
    return np.tanh(x)


_A = [np.float32(v) for v in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                              5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                              4.89352455891786e-03)]  # numerator / x, in x^2, highest power first
_B = [np.float32(v) for v in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                              4.89352518554385e-03)]  # denominator, in x^2


@overload(gate_tanh, jit_options={"fastmath": {"contract"}})
def _gate_tanh(x):
    if x != types.float32:
        return lambda x: np.tanh(x)
    (a13, a11, a9, a7, a5, a3, a1), (b6, b4, b2, b0) = _A, _B
    clamp, tiny = np.float32(7.90531110763549805), np.float32(0.0004)

    def rational(x):
        y = min(max(x, -clamp), clamp)  # beyond 7.9, tanh is within 3e-7 of +-1
        y2 = y * y
        p = ((((((a13 * y2 + a11) * y2 + a9) * y2 + a7) * y2 + a5) * y2 + a3) * y2 + a1) * y
        q = ((b6 * y2 + b4) * y2 + b2) * y2 + b0
        return x if abs(x) < tiny else p / q
    return rational


@njit(cache=True, nogil=True)
def thread_range(m, tid, threads):
    """Thread tid's columns [start, end) of m."""
    return m * tid // threads, m * (tid + 1) // threads


@njit(cache=True, nogil=True, fastmath={"contract"})
def linear(x, w, b, out, start, end):
    """out[:, start:end] = x (B, k) @ w[:, :end - start] + b[:end - start] (w and b hold this thread's columns).
    Four rows of w at a time, each read once for all B rows: a quarter of the loads and stores of out that a
    row at a time costs. Fused multiply-adds (fastmath "contract" only: the order of the sum is kept) read
    cached weights faster than a multiply, then an add (notes/performance.md)."""
    k, c = w.shape[0], end - start
    k4 = k - k % 4
    for r in range(x.shape[0]):
        out[r, start:end] = b[:c]
    for i in range(0, k4, 4):
        w0, w1, w2, w3 = w[i, :c], w[i + 1, :c], w[i + 2, :c], w[i + 3, :c]
        for r in range(x.shape[0]):
            x0, x1, x2, x3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
            o = out[r, start:end]
            for j in range(c):
                o[j] += (x0 * w0[j] + x1 * w1[j]) + (x2 * w2[j] + x3 * w3[j])
    for i in range(k4, k):
        for r in range(x.shape[0]):
            xi = x[r, i]
            o = out[r, start:end]
            for j in range(c):
                o[j] += xi * w[i, j]


@njit(cache=True, nogil=True)
def gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh, tid, threads, flags):
    """One step of the stacked GRU (gates r, z, n as torch.gru_cell): x (B, n_in), h (n_rnn, B, dim) in place.
    This thread computes its c units of each layer; the next layer reads the whole layer below. The weights
    are this thread's (stacked_gru): columns [0, c) are its r gates, [c, 2 c) z and [2 c, 3 c) n."""
    n_rnn, n, d = h.shape
    start, end = thread_range(d, tid, threads)
    c = end - start
    gi = np.empty((n, 3 * c), h.dtype)
    gh = np.empty((n_rnn, n, 3 * c), h.dtype)
    for k in range(n_rnn):
        linear(h[k], w_hh[k], b_hh[k], gh[k], 0, 3 * c)
    sync(flags, tid, threads)  # every thread has read the old h: it may be overwritten
    half = h.dtype.type(0.5)  # a float64 0.5 would turn float32 gates into float64 ones
    for k in range(n_rnn):
        linear(x if k == 0 else h[k - 1], w_ih0 if k == 0 else w_ih[k - 1], b_ih[k], gi, 0, 3 * c)
        for r in range(n):
            i, g, hk = gi[r], gh[k, r], h[k, r, start:end]
            for j in range(c):
                rg = half * gate_tanh(half * (i[j] + g[j])) + half  # sigmoid(a) = (tanh(a / 2) + 1) / 2
                zg = half * gate_tanh(half * (i[c + j] + g[c + j])) + half
                hn = gate_tanh(i[2 * c + j] + rg * g[2 * c + j])
                hk[j] = hn + zg * (hk[j] - hn)
        sync(flags, tid, threads)


@njit(cache=True, nogil=True)
def relu(x, y, out, floor=0.0):
    """out = max(x + y, floor) in x's dtype (a ReLU; floor -inf: none), with no temporary arrays
    (np.maximum(x + y, 0.0) made two, float64)."""
    floor = x.dtype.type(floor)
    for j in range(x.shape[0]):
        out[j] = max(x[j] + y[j], floor)


@njit(cache=True, nogil=True)
def draw(logits, noise, temperature):
    """argmax(logits / temperature + noise) of one row, the first on ties, as lib.sample.draw."""
    best, arg = -np.inf, 0
    for m in range(logits.shape[0]):
        v = logits[m] / temperature + noise[m]
        if v > best:
            best, arg = v, m
    return arg


@njit(cache=True, nogil=True)
def mlp_frame(tid, threads, flags, win, first, t0, cond, table, hidden, hidden_w, hidden_b, logits, out_w, out_b, a,
              zero, noise, temperature, recorded, floor):
    """The sample-level MLP over one frame of FS samples (FS = cond's width / dim), this thread's columns of each
    product: sample j reads window positions first + j .. first + j + FS - 1 (the FS samples before it), is drawn
    with noise step t0 + j and written at first + FS + j; row 0's logits go to recorded[t0 + j] if it has rows.
    a (B, dim) is scratch; zero (dim,) zeros; floor: where the first layer is clipped (0, or -inf: no ReLU)."""
    n, q, d = win.shape[0], logits.shape[2], a.shape[1]
    fs = cond.shape[1] // d
    for j in range(fs):
        p0 = first + j
        for r in range(n):
            a[r, :] = table[win[r, p0]]  # first layer: the table rows of the FS samples before, summed
            for p in range(1, fs):
                a[r, :] += table[p * q + win[r, p0 + p]]
            relu(a[r], cond[r, j * d:(j + 1) * d], a[r], floor)
        for layer in range(hidden_w.shape[0]):
            start, end = thread_range(d, tid, threads)
            linear(a, hidden_w[layer], hidden_b[layer], hidden[layer], start, end)
            sync(flags, tid, threads)
            for r in range(n):
                relu(hidden[layer, r], zero, a[r])
        start, end = thread_range(q, tid, threads)
        out = logits[j % 2]  # two buffers: a thread may write the next sample's while another draws this one
        linear(a, out_w, out_b, out, start, end)
        sync(flags, tid, threads)
        t = t0 + j
        if tid == 0 and recorded.shape[0]:
            recorded[t, :] = out[0]
        for r in range(n):
            win[r, first + fs + j] = draw(out[r], noise[r, t], temperature)


@njit(cache=True, nogil=True)
def twotier_step(tid, threads, flags, noise, windows, frames, h, temperature, recorded, cond, hidden, logits,
                 reals, w_ih0, w_ih, w_hh, b_ih, b_hh, cond_w, cond_b, table, hidden_w, hidden_b, out_w, out_b, floor):
    """FastTwoTierSampler.step for thread tid of `threads`: step_len / FS frames, one after the other; False
    once the team is told to stop (Team.close). windows (threads, B, 2 FS) levels, each thread's own copy (the
    last frame, then the new one); frames (B, step_len) levels (thread 0 writes them); h (n_rnn, B, dim);
    noise (B, step_len, Q); recorded (step_len, Q) gets row 0's logits if it has rows. Shared by the
    threads: cond (B, FS dim), hidden (n_hidden, B, dim) and logits (2, B, Q). Weights with a leading thread
    axis (module docstring): cond_w (threads, dim, FS dim / threads), hidden_w (threads, n_hidden, dim,
    dim / threads), out_w (threads, dim, Q / threads), rounded up."""
    sync(flags, tid, threads)  # start: the caller has put the noise in place
    if flags[threads * LINE]:
        return False
    win = windows[tid]
    n, fs, d = win.shape[0], win.shape[1] // 2, h.shape[2]
    if tid:
        win[:, :fs] = windows[0, :, :fs]
    w_ih0, w_ih, w_hh, b_ih, b_hh, cond_w, cond_b = w_ih0[tid], w_ih[tid], w_hh[tid], b_ih[tid], b_hh[tid], \
        cond_w[tid], cond_b[tid]
    hidden_w, hidden_b, out_w, out_b = hidden_w[tid], hidden_b[tid], out_w[tid], out_b[tid]
    x = np.empty((n, fs), h.dtype)
    a, zero = np.empty((n, d), h.dtype), np.zeros(d, h.dtype)  # the MLP's scratch (mlp_frame)
    for f in range(frames.shape[1] // fs):
        for r in range(n):
            for j in range(fs):
                x[r, j] = reals[win[r, j]]
        gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh, tid, threads, flags)  # its first barrier: all are past
        start, end = thread_range(fs * d, tid, threads)                             # the last frame's MLP
        linear(h[h.shape[0] - 1], cond_w, cond_b, cond, start, end)
        sync(flags, tid, threads)
        mlp_frame(tid, threads, flags, win, 0, f * fs, cond, table, hidden, hidden_w, hidden_b, logits, out_w, out_b,
                  a, zero, noise, temperature, recorded, floor)
        win[:, :fs] = win[:, fs:]
        if tid == 0:
            frames[:, f * fs:(f + 1) * fs] = win[:, :fs]
    sync(flags, tid, threads)  # end: all are done with this call's noise
    return True


@njit(cache=True, nogil=True)
def threetier_step(tid, threads, flags, noise, windows, frames, h, temperature, recorded, above, x_frame, cond, hidden,
                   logits, reals, bw_ih0, bw_ih, bw_hh, bb_ih, bb_hh, above_w, above_b, in_w, in_b, fw_ih0, fw_ih,
                   fw_hh, fb_ih, fb_hh, cond_w, cond_b, table, hidden_w, hidden_b, out_w, out_b, floor):
    """FastThreeTierSampler.step for thread tid of `threads`, as twotier_step with a big tier above the frame tier:
    per big frame, the big GRU (h[:n_rnn]) steps once and its projection `above` (B, BFS / FS dim) gives each of
    the BFS / FS frames below the vector added to the frame GRU's input x_frame (B, dim); the frame GRU
    (h[n_rnn:]) and the MLP then run as in twotier_step. windows (threads, B, 2 BFS): the last big frame, then
    the new one. above, x_frame, cond, hidden and logits are shared by the threads, each writing its columns."""
    sync(flags, tid, threads)  # start: the caller has put the noise in place
    if flags[threads * LINE]:
        return False
    win = windows[tid]
    n, bfs, d, n_rnn = win.shape[0], win.shape[1] // 2, h.shape[2], h.shape[0] // 2
    fs = cond.shape[1] // d
    if tid:
        win[:, :bfs] = windows[0, :, :bfs]
    bw_ih0, bw_ih, bw_hh, bb_ih, bb_hh, above_w, above_b = bw_ih0[tid], bw_ih[tid], bw_hh[tid], bb_ih[tid], \
        bb_hh[tid], above_w[tid], above_b[tid]
    in_w, in_b, fw_ih0, fw_ih, fw_hh, fb_ih, fb_hh = in_w[tid], in_b[tid], fw_ih0[tid], fw_ih[tid], fw_hh[tid], \
        fb_ih[tid], fb_hh[tid]
    cond_w, cond_b, hidden_w, hidden_b, out_w, out_b = cond_w[tid], cond_b[tid], hidden_w[tid], hidden_b[tid], \
        out_w[tid], out_b[tid]
    big_h, frame_h = h[:n_rnn], h[n_rnn:]
    x_big, x_in = np.empty((n, bfs), h.dtype), np.empty((n, fs), h.dtype)
    a, zero = np.empty((n, d), h.dtype), np.zeros(d, h.dtype)  # the MLP's scratch (mlp_frame)
    for b in range(frames.shape[1] // bfs):
        for r in range(n):
            for j in range(bfs):
                x_big[r, j] = reals[win[r, j]]
        gru_stack(x_big, big_h, bw_ih0, bw_ih, bw_hh, bb_ih, bb_hh, tid, threads, flags)
        start, end = thread_range(above.shape[1], tid, threads)
        linear(big_h[n_rnn - 1], above_w, above_b, above, start, end)
        sync(flags, tid, threads)
        for f in range(bfs // fs):
            s = bfs + f * fs  # the frame's first sample in the window
            for r in range(n):
                for j in range(fs):
                    x_in[r, j] = reals[win[r, s - fs + j]]
            start, end = thread_range(d, tid, threads)
            linear(x_in, in_w, in_b, x_frame, start, end)
            for r in range(n):
                x_frame[r, start:end] += above[r, f * d + start:f * d + end]
            # gru_stack reads x_frame after its first barrier: every thread's columns are written by then
            gru_stack(x_frame, frame_h, fw_ih0, fw_ih, fw_hh, fb_ih, fb_hh, tid, threads, flags)
            start, end = thread_range(fs * d, tid, threads)
            linear(frame_h[n_rnn - 1], cond_w, cond_b, cond, start, end)
            sync(flags, tid, threads)
            mlp_frame(tid, threads, flags, win, s - fs, b * bfs + f * fs, cond, table, hidden, hidden_w, hidden_b,
                      logits, out_w, out_b, a, zero, noise, temperature, recorded, floor)
        win[:, :bfs] = win[:, bfs:]
        if tid == 0:
            frames[:, b * bfs:(b + 1) * bfs] = win[:, :bfs]
    sync(flags, tid, threads)  # end: all are done with this call's noise
    return True


@njit(cache=True, nogil=True)
def flat_step(tid, threads, flags, noise, lasts, frame, h, temperature, recorded, logits, inputs, w_ih0, w_ih,
               w_hh, b_ih, b_hh, out_w, out_b):
    """FastFlatSampler.step for thread tid of `threads`; False once the team is told to stop (Team.close).
    lasts (threads, B, 1) levels, each thread's own copy; frame (B, step_len) levels (thread 0 writes it);
    h (n_rnn, B, dim); noise (B, step_len, Q); recorded (step_len, Q) gets row 0's logits if it has rows;
    logits (2, B, Q) shared by the threads."""
    sync(flags, tid, threads)
    if flags[threads * LINE]:
        return False
    last = lasts[tid]
    if tid:
        last[:] = lasts[0]
    n, q = last.shape[0], logits.shape[2]
    w_ih0, w_ih, w_hh, b_ih, b_hh, out_w, out_b = w_ih0[tid], w_ih[tid], w_hh[tid], b_ih[tid], b_hh[tid], \
        out_w[tid], out_b[tid]
    start, end = thread_range(q, tid, threads)
    x = np.empty((n, inputs.shape[1]), h.dtype)
    for t in range(frame.shape[1]):
        for r in range(n):
            x[r, :] = inputs[last[r, 0]]
        gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh, tid, threads, flags)
        out = logits[t % 2]
        linear(h[h.shape[0] - 1], out_w, out_b, out, start, end)
        sync(flags, tid, threads)
        if tid == 0 and recorded.shape[0]:
            recorded[t, :] = out[0]
        for r in range(n):
            last[r, 0] = draw(out[r], noise[r, t], temperature)
            if tid == 0:
                frame[r, t] = last[r, 0]
    sync(flags, tid, threads)
    return True


@njit(cache=True, nogil=True)
def twotier_worker(*args):
    while twotier_step(*args):
        pass


@njit(cache=True, nogil=True)
def threetier_worker(*args):
    while threetier_step(*args):
        pass


@njit(cache=True, nogil=True)
def flat_worker(*args):
    while flat_step(*args):
        pass
