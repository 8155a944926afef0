"""The fast path's frame step compiled for the CPU with numba: one call per frame, no Python in between.

At small batch on the CPU the numpy step spends about half its time in the ~1 us each of its hundred small
calls per frame; compiled, a frame costs little more than reading the weights once. Each function here is
the numpy step of two_tier.py / baseline.py written as loops over rows; tests/test_sample.py checks that
they give exactly the reference's samples. Weights come in as plain float arrays, transposed as in the
numpy step, with the GRU layers stacked: w_ih0 (n_in, 3 dim) for layer 0, w_ih (n_rnn - 1, dim, 3 dim) for
the others, w_hh (n_rnn, dim, 3 dim), b_ih and b_hh (n_rnn, 3 dim).
Compiled code is cached next to this file (numba's cache=True): the first call per dtype takes seconds.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def linear(x, w, b, out):
    """out (B, m) = x (B, k) @ w (k, m) + b: each row of w is read once for all B rows."""
    for r in range(x.shape[0]):
        out[r, :] = b
    for i in range(w.shape[0]):
        for r in range(x.shape[0]):
            xi = x[r, i]
            for j in range(w.shape[1]):
                out[r, j] += xi * w[i, j]


@njit(cache=True)
def gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh):
    """One step of the stacked GRU (gates r, z, n as torch.gru_cell): x (B, n_in), h (n_rnn, B, dim) in place."""
    d = h.shape[2]
    gi = np.empty((x.shape[0], 3 * d), h.dtype)
    gh = np.empty((x.shape[0], 3 * d), h.dtype)
    for k in range(h.shape[0]):
        linear(x if k == 0 else h[k - 1], w_ih0 if k == 0 else w_ih[k - 1], b_ih[k], gi)
        linear(h[k], w_hh[k], b_hh[k], gh)
        for r in range(h.shape[1]):
            for j in range(d):
                rg = 0.5 * np.tanh(0.5 * (gi[r, j] + gh[r, j])) + 0.5
                zg = 0.5 * np.tanh(0.5 * (gi[r, d + j] + gh[r, d + j])) + 0.5
                n = np.tanh(gi[r, 2 * d + j] + rg * gh[r, 2 * d + j])
                h[k, r, j] = n + zg * (h[k, r, j] - n)


@njit(cache=True)
def draw(logits, noise, temperature):
    """argmax(logits / temperature + noise) of one row, the first on ties, as lib.sample.draw."""
    best, arg = -np.inf, 0
    for m in range(logits.shape[0]):
        v = logits[m] / temperature + noise[m]
        if v > best:
            best, arg = v, m
    return arg


@njit(cache=True)
def twotier_frame(win, h, noise, temperature, recorded, reals, w_ih0, w_ih, w_hh, b_ih, b_hh, cond_w, cond_b,
                  table, hidden_w, hidden_b, out_w, out_b):
    """FastTwoTierSampler.step: win (B, 2 FS) levels (the last frame, then the new one), h (n_rnn, B, dim),
    noise (B, FS, Q); recorded (FS, Q) gets row 0's logits if it has rows. hidden_w (2, dim, dim)."""
    n, fs, q, d = win.shape[0], win.shape[1] // 2, out_w.shape[1], h.shape[2]
    x = np.empty((n, fs), h.dtype)
    for r in range(n):
        for j in range(fs):
            x[r, j] = reals[win[r, j]]
    gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh)
    cond = np.empty((n, fs * d), h.dtype)
    linear(h[h.shape[0] - 1], cond_w, cond_b, cond)
    a, a2, logits = np.empty((n, d), h.dtype), np.empty((n, d), h.dtype), np.empty((n, q), h.dtype)
    for j in range(fs):
        for r in range(n):
            a[r, :] = table[win[r, j]]  # first layer: the table rows of the FS samples before, summed
            for p in range(1, fs):
                a[r, :] += table[p * q + win[r, j + p]]
            a[r, :] += cond[r, j * d:(j + 1) * d]
        for r in range(n):
            a[r, :] = np.maximum(a[r], 0.0)
        for layer in range(hidden_w.shape[0]):
            linear(a, hidden_w[layer], hidden_b[layer], a2)
            for r in range(n):
                a[r, :] = np.maximum(a2[r], 0.0)
        linear(a, out_w, out_b, logits)
        if recorded.shape[0]:
            recorded[j, :] = logits[0]
        for r in range(n):
            win[r, fs + j] = draw(logits[r], noise[r, j], temperature)
    for r in range(n):
        win[r, :fs] = win[r, fs:]


@njit(cache=True)
def flat_frame(last, frame, h, noise, temperature, recorded, inputs, w_ih0, w_ih, w_hh, b_ih, b_hh, out_w,
               out_b):
    """FastFlatSampler.step: last (B, 1) and frame (B, frame_len) levels, h (n_rnn, B, dim),
    noise (B, frame_len, Q); recorded (frame_len, Q) gets row 0's logits if it has rows."""
    n, q = last.shape[0], out_w.shape[1]
    x = np.empty((n, inputs.shape[1]), h.dtype)
    logits = np.empty((n, q), h.dtype)
    for t in range(frame.shape[1]):
        for r in range(n):
            x[r, :] = inputs[last[r, 0]]
        gru_stack(x, h, w_ih0, w_ih, w_hh, b_ih, b_hh)
        linear(h[h.shape[0] - 1], out_w, out_b, logits)
        if recorded.shape[0]:
            recorded[t, :] = logits[0]
        for r in range(n):
            last[r, 0] = draw(logits[r], noise[r, t], temperature)
            frame[r, t] = last[r, 0]


def stacked_gru(gru):
    """lib.layers.gru_weights as numpy arrays -> (w_ih0, w_ih, w_hh, b_ih, b_hh) as the kernels take them."""
    w_hh = np.stack([layer[1] for layer in gru])  # (n_rnn, dim, 3 dim)
    w_ih = np.stack([layer[0] for layer in gru[1:]]) if len(gru) > 1 else w_hh[:0]  # layers 1.. (dim, 3 dim)
    return gru[0][0], w_ih, w_hh, np.stack([layer[2] for layer in gru]), np.stack([layer[3] for layer in gru])
