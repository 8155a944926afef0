"""The parts of the GPU paths that a CPU can check: Adam's capturable flag after resume, the splits held on a device
once each, the GRUs outside autocast, DDP without the unused-parameter search, the torch floor."""
import pytest
import torch

from lib import UserError
from lib.cli import check_torch
from lib.data import load_splits
from lib.layers import GRUStack
from lib.checkpoint import load_optimizer
from lib.step import make_optimizer
from lib.data import hold_on_device
from test_models import small


@pytest.mark.parametrize("saved, now", [(False, True), (True, False)])
def test_resume_sets_adams_capturable_flag_from_this_sessions_cuda_graph(saved, now):
    """A run made without --cuda_graph_step resumed with it (and back): load_state_dict alone would keep the saved
    flag, and the capture would fail (or the eager run keep the graph's path)."""
    m = small()
    opt = make_optimizer(m, 1e-3, capturable=False)
    opt.param_groups[0]["capturable"] = saved  # as the saved run's optimizer had it
    chunk = torch.randint(256, (2, 2 + 16), generator=torch.Generator().manual_seed(0))
    m(chunk, None)[0].sum().backward()
    opt.step()
    state = opt.state_dict()
    resumed = make_optimizer(m, 1e-3, capturable=now)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["capturable"] == saved  # what plain loading does
    load_optimizer(resumed, state, now)
    assert all(g["capturable"] == now for g in resumed.param_groups)
    assert resumed.state_dict()["state"][0]["step"] == state["state"][0]["step"]


def test_one_files_data_is_held_on_the_device_once(speech_wav):
    splits, _ = load_splits(speech_wav)
    for s in splits.values():
        s.set_quantization(256, "linear")
    held = hold_on_device(splits, torch.device("cpu"), 256)
    assert held["train"] is held["valid"] is held["test"]
    assert held["train"].pcm.dtype == torch.uint8


def test_the_grus_run_in_float32_under_autocast():
    """bf16 autocast must not reach the GRUs (on CUDA its cuDNN rule would make them float16); on the CPU the same
    code keeps them float32 while a linear layer beside them is autocast."""
    gru, lin = GRUStack(4, 16, 2), torch.nn.Linear(4, 4)
    x = torch.randn(3, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = gru(x, None)
        assert lin(x).dtype == torch.bfloat16
    assert out.dtype == h.dtype == torch.float32
    torch.testing.assert_close(out, gru(x, None)[0], rtol=0, atol=0)  # the same as without autocast


@pytest.mark.parametrize("version, refused", [("2.5.1+cu121", True), ("2.2.0", True), ("1.13.1", True),
                                              ("2.6.0", False), ("2.13.0+cpu", False), ("3.0.0a0", False)])
def test_an_older_torch_is_one_line_naming_the_floor(version, refused):
    if refused:
        with pytest.raises(UserError, match=r"older than 2\.6.*pip install 'torch>=2\.6'"):
            check_torch(version)
    else:
        check_torch(version)


def test_requirements_ask_for_the_torch_the_code_needs():
    import os
    from conftest import REPO
    line, = [s for s in open(os.path.join(REPO, "requirements.txt")) if s.startswith("torch")]
    assert line.strip() == "torch>=2.6"
    assert hasattr(torch.nn.utils, "get_total_norm")


def test_ddp_leaves_h0_out_and_searches_no_unused_parameters(tmp_path):
    """One gloo process: h0 is in DDP's ignore list and find_unused_parameters is off (the 2 x B == 1 x 2B test in
    test_dist.py checks that h0's gradient is still averaged)."""
    import torch.distributed as tdist
    from lib import dist
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = small()
        net = dist.wrap(m, torch.device("cpu"))
        assert net.find_unused_parameters is False
        assert [n for n, _ in dist.initial_states(m)] == ["frame_rnn.rnn.h0"]
        assert "frame_rnn.rnn.h0" in net.parameters_to_ignore
    finally:
        tdist.destroy_process_group()
