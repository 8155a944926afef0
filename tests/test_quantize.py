import pytest
import torch

from lib import UserError
from lib.quantize import QTYPES, dequantize, normalize, q_zero, quantize, to_reals


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("q_levels", [2, 16, 256, 65536])
def test_every_level_round_trips(qtype, q_levels):
    levels = torch.arange(q_levels)
    assert torch.equal(quantize(dequantize(levels, q_levels, qtype), q_levels, qtype), levels)


@pytest.mark.parametrize("qtype", QTYPES)
def test_edges_silence_and_clipping(qtype):
    x = torch.tensor([-5.0, -1.5, -1.0, 0.0, 1.0, 1.5, 7.0])
    q = quantize(x, 256, qtype)
    assert q.tolist() == [0, 0, 0, q_zero(256), 255, 255, 255]
    assert dequantize(torch.tensor([q_zero(256)]), 256, qtype).item() == 0.0
    assert dequantize(torch.tensor([0]), 256, qtype).item() == -1.0


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_is_monotonic_and_error_is_within_a_step(qtype):
    x = torch.linspace(-1, 1, 100001)
    q = quantize(x, 256, qtype)
    assert (q[1:] >= q[:-1]).all()
    assert q.min() == 0 and q.max() == 255
    # the decoded value is the nearest level: no level is closer to x than the one chosen
    decoded = dequantize(q, 256, qtype).double()
    all_levels = dequantize(torch.arange(256), 256, qtype).double()
    nearest = (x.double()[:, None] - all_levels[None]).abs().min(dim=1).values
    step = 2 / 256
    assert ((x.double() - decoded).abs() <= nearest + step).all()
    if qtype == "linear":
        inside = x < 1 - step
        assert ((x.double() - decoded).abs()[inside] <= step / 2 + 1e-9).all()


def test_mulaw_spends_levels_on_quiet_samples():
    quiet = torch.linspace(-0.01, 0.01, 1001)
    assert quantize(quiet, 256, "mulaw").unique().numel() > 4 * quantize(quiet, 256, "linear").unique().numel()


def test_normalize_zero_dc_and_minmax():
    x = torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.5, 0.5, 0.5, 0.5]])
    assert normalize(x, zero_dc=True).mean(dim=1).abs().max() < 1e-12
    mm = normalize(x, norm="minmax")
    assert mm[0].min() == -1 and mm[0].max() == 1
    # a constant clip becomes silence rather than NaN
    assert torch.equal(mm[1], torch.zeros(4, dtype=mm.dtype))
    assert torch.equal(quantize(mm[1], 256), torch.full((4,), q_zero(256)))


def test_reals_span_minus_two_to_two():
    r = to_reals(torch.tensor([0, 128, 255]), 256)
    assert r.tolist() == [-2.0, 0.0, 2 - 4 / 256]  # (level / 128 - 1) * 2


@pytest.mark.parametrize("q_levels", [16, 256])
def test_linear_rounds_to_the_nearest_level_between_levels(q_levels):
    """Points between two levels go to the nearer one (round, not floor)."""
    step = 2 / q_levels
    centres = dequantize(torch.arange(1, q_levels - 1), q_levels, "linear").double()
    for offset, expected in ((0.4, 0), (-0.4, 0), (0.6, 1), (-0.6, -1)):
        got = quantize(centres + offset * step, q_levels, "linear")
        assert torch.equal(got, torch.arange(1, q_levels - 1) + expected), offset


@pytest.mark.parametrize("qtype", ["mulaw", "alaw"])
def test_companded_error_is_within_half_a_step_in_the_compressed_domain(qtype):
    """Near silence mu-law and a-law levels are dense in x: the bound that holds is half a level in the
    compressed domain, where the levels are evenly spaced."""
    from lib.quantize import _compress
    x = torch.linspace(-1, 1, 200001, dtype=torch.float64)
    decoded = dequantize(quantize(x, 256, qtype), 256, qtype).double()
    y = _compress(x, 256, qtype)
    err = (y - _compress(decoded, 256, qtype)).abs()[y < 1 - 2 / 256]  # the top level is clamped, as in linear
    assert err.max() <= 1 / 256 + 1e-6


@pytest.mark.parametrize("q_levels", [0, 1, 255, 65538])
def test_unsupported_levels_are_refused(q_levels):
    with pytest.raises(UserError, match="q_levels"):
        quantize(torch.zeros(3), q_levels)
