"""Layers with the original initialization:
LeCun uniform for linear layers, He uniform for layers followed by ReLU, orthogonal for the square recurrent
matrices of GRUs; weight norm on every linear layer (not on embeddings, not inside the cuDNN GRU).
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def linear(n_in, n_out, init="lecun", bias=True):
    """Weight-normed nn.Linear; init 'lecun' (uniform, var 1/fan_in) or 'he' (uniform, var 2/fan_in)."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    gain = {"lecun": 1.0, "he": 2.0}[init]
    bound = math.sqrt(3.0 * gain / n_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if bias:
            layer.bias.zero_()
    return weight_norm(layer)  # g starts at the row norms, so the initial function is unchanged


class GRUStack(nn.Module):
    """n_rnn stacked GRUs (cuDNN on CUDA) with a learned initial state h0 of shape (n_rnn, 1, dim)."""

    def __init__(self, n_in, dim, n_rnn):
        super().__init__()
        self.gru = nn.GRU(n_in, dim, n_rnn, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(n_rnn, 1, dim))
        with torch.no_grad():
            for name, w in self.gru.named_parameters():
                if name.startswith("weight_hh"):  # three square (dim, dim) gate matrices
                    for block in w.chunk(3, dim=0):
                        nn.init.orthogonal_(block)
                elif name.startswith("weight_ih"):
                    w.uniform_(-math.sqrt(3.0 / w.shape[1]), math.sqrt(3.0 / w.shape[1]))
                else:
                    w.zero_()

    def initial_state(self, batch_size):
        return self.h0.expand(-1, batch_size, -1).contiguous()

    def forward(self, x, h):
        """x (B, T, n_in), h (n_rnn, B, dim) or None for h0 -> out (B, T, dim), h (n_rnn, B, dim)."""
        if h is None:
            h = self.initial_state(x.shape[0])
        # autocast's rule for the cuDNN RNN (ATen's AutocastRNN.cpp) casts to float16 whatever dtype was asked: under
        # bf16 the GRUs would run in float16, without loss scaling. They run in their weights' dtype instead (float32,
        # TF32 where allowed).
        with torch.autocast(x.device.type, enabled=False):
            return self.gru(x.to(self.h0.dtype), h.to(self.h0.dtype))


def gru_weights(gru):
    """Per layer (weight_ih^T, weight_hh^T, bias_ih, bias_hh) of an nn.GRU, for stepping it with gru_step."""
    return [(getattr(gru, f"weight_ih_l{k}").detach().t().contiguous(),
             getattr(gru, f"weight_hh_l{k}").detach().t().contiguous(),
             getattr(gru, f"bias_ih_l{k}").detach(), getattr(gru, f"bias_hh_l{k}").detach())
            for k in range(gru.num_layers)]


def gru_step(x, h, weights, xp):
    """One time step of the stacked GRU on numpy arrays or torch tensors (xp is numpy or torch):
    x (B, n_in), h (n_rnn, B, dim) updated in place -> top output (B, dim)."""
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        if xp is torch:  # torch's fused cell: a GPU at small batch is bound by the number of kernels
            h[k] = torch.gru_cell(x, h[k], w_ih.t(), w_hh.t(), b_ih, b_hh)
        else:
            h[k] = gru_cell_numpy(x, h[k], w_ih, w_hh, b_ih, b_hh)
        x = h[k]
    return x


def gru_cell_numpy(x, h, w_ih, w_hh, b_ih, b_hh):
    """torch.gru_cell in numpy (gates r, z, n), with transposed weights -> the new h."""
    d = h.shape[-1]
    gi = x @ w_ih
    gi += b_ih
    gh = h @ w_hh
    gh += b_hh
    rz = gi[:, :2 * d]
    rz += gh[:, :2 * d]
    rz = np.tanh(rz * 0.5, out=rz)  # sigmoid(v) = (tanh(v / 2) + 1) / 2, which cannot overflow as exp can
    rz += 1
    rz *= 0.5
    n = gi[:, 2 * d:]
    n += rz[:, :d] * gh[:, 2 * d:]
    n = np.tanh(n, out=n)
    return n + rz[:, d:] * (h - n)  # (1 - z) * n + z * h


def linear_t(layer):
    """(weight^T, bias) of a weight-normed linear layer, for x @ weight^T + bias; call under parametrize.cached()."""
    return layer.weight.detach().t().contiguous(), layer.bias.detach()
