"""Quantization: audio in [-1, 1] <-> integer levels in [0, q_levels).

Every type maps silence (0.0) to `q_zero = q_levels // 2` and decodes `q_zero` back to exactly 0.0.
  linear  a fixed map of [-1, 1]: level = round((x + 1) * q_levels / 2), clipped to the top level
  mulaw   mu-law companding (mu = q_levels - 1), then the linear map
  alaw    A-law companding (A = 87.6, as in G.711), then the linear map
Per-clip options applied before quantizing: `zero_dc` (subtract the clip's mean) and `norm='minmax'`
(stretch each clip's min..max to -1..1, as the original code did; kept to compare with old numbers).
Values outside [-1, 1] are clipped, NaN is silence: a level is always in [0, q_levels).
"""
import math

import numpy as np

import torch

from lib import UserError

QTYPES = ("linear", "mulaw", "alaw")
NORMS = ("none", "minmax")
ALAW_A = 87.6


def check_q_levels(q_levels, qtype):
    if qtype not in QTYPES:
        raise UserError(f"--qtype {qtype!r} is unknown: use one of {', '.join(QTYPES)}")
    if not (2 <= q_levels <= 65536 and q_levels % 2 == 0):
        raise UserError(f"--q_levels {q_levels} is not supported: use an even number from 2 to 65536 (default 256)")


def q_zero(q_levels):
    return q_levels // 2


def _compress(x, q_levels, qtype):
    if qtype == "linear":
        return x
    if qtype == "mulaw":
        mu = q_levels - 1
        return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    a = x.abs()  # alaw
    small = ALAW_A * a / (1 + math.log(ALAW_A))
    large = (1 + torch.log(torch.clamp(ALAW_A * a, min=1.0))) / (1 + math.log(ALAW_A))
    return torch.sign(x) * torch.where(a < 1 / ALAW_A, small, large)


def _expand(y, q_levels, qtype):
    if qtype == "linear":
        return y
    if qtype == "mulaw":
        mu = q_levels - 1
        return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu
    a = y.abs()  # alaw
    threshold = 1 / (1 + math.log(ALAW_A))
    small = a * (1 + math.log(ALAW_A)) / ALAW_A
    large = torch.exp(a * (1 + math.log(ALAW_A)) - 1) / ALAW_A
    return torch.sign(y) * torch.where(a < threshold, small, large)


def normalize(clips, zero_dc=False, norm="none"):
    """Per-clip preprocessing of float audio (..., T). A constant clip becomes silence, never NaN."""
    x = clips.double()
    if zero_dc:
        x = x - x.mean(dim=-1, keepdim=True)
    if norm == "minmax":
        x = stretch(x, x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))
    elif norm != "none":
        raise UserError(f"--norm {norm!r} is unknown: use one of {', '.join(NORMS)}")
    return x


def stretch(x, lo, hi):
    """--norm minmax: x from [lo, hi] to [-1, 1], per clip; a constant clip becomes silence, never NaN."""
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12) * 2 - 1, torch.zeros_like(x))


def quantize(x, q_levels=256, qtype="linear"):
    """Float audio -> int64 levels in [0, q_levels). Input outside [-1, 1] is clipped; NaN becomes silence
    (the readers refuse NaN before this; here it must still never make a level outside the range)."""
    check_q_levels(q_levels, qtype)
    y = _compress(torch.nan_to_num(x.double(), nan=0.0).clamp(-1.0, 1.0), q_levels, qtype)
    return torch.round((y + 1) * (q_levels / 2)).clamp(0, q_levels - 1).long()


def dequantize(q, q_levels=256, qtype="linear"):
    """Integer levels -> float32 audio in [-1, 1); q_zero -> 0.0 exactly."""
    check_q_levels(q_levels, qtype)
    y = q.double() / (q_levels / 2) - 1
    return _expand(y, q_levels, qtype).float()


def code_bits(q_levels, qtype):
    """(q_levels,) float64: log2 of how many 16-bit PCM values each level stands for (-inf for none). A model's
    NLL of a level plus its code_bits is the NLL of the 16-bit sample under a density spread evenly over the
    level's values: NLLs of different quantizations are not comparable as numbers, these are."""
    levels = quantize(torch.arange(-32768, 32768, dtype=torch.float64) / 32768, q_levels, qtype)
    with np.errstate(divide="ignore"):
        return np.log2(np.bincount(levels.numpy(), minlength=q_levels).astype(np.float64))


def to_reals(q, q_levels):
    """Levels -> the reals in [-2, 2] that the RNNs read (as in the original code)."""
    return (q.float() / (q_levels / 2) - 1) * 2
