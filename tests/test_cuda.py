"""The same checks on a GPU: skipped where torch sees no CUDA device (as in CI). Run them on a GPU box with
    python -m pytest -q tests/test_cuda.py
"""
import glob
import os

import pytest
import torch

from conftest import run_main
from generate import main as generate_main
from lib.sample import generate
from test_sample import Q, model
from test_train import SCRIPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("kind", ["twotier_fs2", "twotier_fs3", "baseline_reals", "baseline_embed"])
@pytest.mark.parametrize("temperature, primed", [(1.0, False), (0.6, True)])
def test_fast_path_and_cuda_graphs_equal_reference_on_cuda(kind, temperature, primed):
    """The fast step on torch, plain and replayed as CUDA graphs, gives the reference's samples (float64, so that
    rounding cannot move an argmax); in float32 the same seed gives the same samples twice."""
    m = model(kind).cuda()
    prime = torch.randint(Q, (23,), generator=torch.Generator().manual_seed(3)) if primed else None
    kw = dict(seed=11, temperature=temperature, prime=prime)
    ref = generate(m, 3, 77, fast=False, **kw)
    fast = generate(m, 3, 77, cuda_graph=False, **kw)
    graphed = generate(m, 3, 77, **kw)  # CUDA graphs: the default on CUDA
    assert ref.device.type == "cuda" and ref.shape == (3, 77)
    assert torch.equal(ref, fast) and torch.equal(ref, graphed)
    m32 = model(kind, torch.float32).cuda()
    assert torch.equal(generate(m32, 3, 77, cuda_graph=False, **kw), generate(m32, 3, 77, cuda_graph=False, **kw))
    assert torch.equal(generate(m32, 3, 77, **kw), generate(m32, 3, 77, **kw))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_train_and_generate_on_cuda(tmp_path, speech_wav, name):
    """A tiny run trains on the GPU, and generate.py writes the same files from it twice (CUDA graphs, the
    default), and without them too."""
    runs_dir = tmp_path / "runs"
    assert run_main(SCRIPTS[name], ["--preset", "tiny", "--data", speech_wav, "--runs_dir", str(runs_dir),
                                    "--device", "cuda"]) == 0
    (run_dir,) = glob.glob(str(runs_dir / "*"))
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "device cuda" in log and "on the GPU as levels" in log  # batches gathered on the GPU
    for out, flags in (("a", []), ("b", []), ("plain", ["--no_cuda_graph_sampling"])):
        assert run_main(generate_main, [run_dir, "--n", "2", "--secs", "0.1", "--device", "cuda", "--out",
                                        str(tmp_path / out), *flags]) == 0
    files = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".wav"))
    assert len(files) == 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        # the same kernels launched one by one: the same float32 logits, so the same draws
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "a" / f).read_bytes()


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_training_step_on_cuda_at_each_precision(precision, tf32_restored):
    """On the GPU, the sync-free step at each precision gives the CPU fp32 step's loss on the same chunk and
    weights (bf16 within 1 %), and a few steps lower the loss."""
    import copy
    from lib.step import make_optimizer, set_precision, train_step
    from test_models import small
    cpu = small()
    gpu = copy.deepcopy(cpu).cuda()
    chunk = torch.randint(Q, (4, 2 + 16), generator=torch.Generator().manual_seed(0))
    set_precision("fp32")
    ref, _, _ = train_step(cpu, make_optimizer(cpu, 1e-3), chunk, True, None, 1.0)
    set_precision(precision)
    assert torch.backends.cuda.matmul.allow_tf32 == (precision != "fp32")
    opt = make_optimizer(gpu, 1e-3)
    first, _, h = train_step(gpu, opt, chunk.cuda(), True, None, 1.0, precision)
    # fp32 is fp32 (1e-5: reduction order only); tf32 rounds products to 10 bits; bf16 to 7
    assert first.item() == pytest.approx(ref.item(), rel={"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2}[precision])
    if precision == "bf16":  # autocast did act: the loss differs from fp32's beyond fp32 rounding
        assert first.item() != pytest.approx(ref.item(), rel=1e-6)
    for _ in range(20):
        bits, _, h = train_step(gpu, opt, chunk.cuda(), True, h, 1.0, precision)
    assert bits.item() < first.item() - 0.1


def test_first_layer_tables_on_cuda():
    """The MLP's first layer as per-position tables (off by default on CUDA until the bench measures it faster)
    gives the product's loss and gradients on the GPU too (float64)."""
    import copy
    from lib.step import chunk_loss
    from test_models import small
    product = small(fs=4, n_frames=4).double().cuda()
    tables = copy.deepcopy(product)
    assert product.sample_mlp.use_tables is None  # auto: off on CUDA
    tables.sample_mlp.use_tables = True
    x = torch.randint(Q, (3, 4 + 16), generator=torch.Generator().manual_seed(1)).cuda()
    losses = []
    for m in (product, tables):
        nll, _, _ = chunk_loss(m, x, None)
        nll.backward()
        losses.append(nll.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for a, b in zip(product.parameters(), tables.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["twotier", "twotier_tables", "twotier_graphed", "baseline_embed"])
def test_training_steps_never_wait_for_the_gpu(kind):
    """Batches gathered from the levels held on the GPU, and the step the loop runs, make no host round-trip after
    warm-up: CUDA's sync debug mode raises at any call that waits for the device. 32 x 128 chunks, so that the
    embeddings' backward takes its sorting path (over 3,072 indices)."""
    import math
    from lib.cuda_graph import captured_at_first_call
    from lib import DEFAULT_DATA
    from lib.data import ChunkBatches, load_splits
    from lib.step import make_optimizer, train_step
    from test_models import flat, small
    m = (flat("embed", seq_len=128) if kind.startswith("baseline") else small(fs=2, n_frames=64)).cuda()
    if kind == "twotier_tables":
        m.sample_mlp.use_tables = True
    opt = make_optimizer(m, 1e-3, capturable=kind.endswith("graphed"))
    step = (captured_at_first_call(m, opt, 1.0, "tf32") if kind.endswith("graphed") else
            lambda chunk, reset, h: train_step(m, opt, chunk, reset, h, 1.0))
    splits, _ = load_splits(DEFAULT_DATA)
    splits["train"].set_quantization(Q, "linear")
    train = splits["train"].on_device(torch.device("cuda"), Q)
    batches = ChunkBatches(train, 32, m.seq_len, m.overlap, Q, seed=0)
    batches.chunks_per_clip = 4  # a clip's first chunk (reset) among the timed steps
    state = {"h": None, "bits": 0.0}

    def train(iterations):
        for it in iterations:
            chunk, reset = batches(it)
            bits, _, state["h"] = step(chunk.to("cuda", non_blocking=True), reset, state["h"])
            state["bits"] = state["bits"] + bits

    train(range(4))  # warm-up: lazy initialization and the capture may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(range(4, 12))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(state["bits"]))


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_graphed_step_equals_the_eager_step(precision, tf32_restored):
    """The training step captured as CUDA graphs (lib/cuda_graph.py) gives the eager step's losses, grad norms and
    weights over 100 steps on real chunks, with a clip's first chunk every 10 steps (both graphs), to float
    tolerance; the warm-up before the capture leaves no trace."""
    import copy
    from lib.cuda_graph import GraphedStep
    from lib import DEFAULT_DATA
    from lib.data import ChunkBatches, load_splits
    from lib.step import make_optimizer, set_precision, train_step
    from test_models import small
    set_precision(precision)
    eager = small(fs=2, n_frames=16).cuda()
    graphed = copy.deepcopy(eager)
    opt_e, opt_g = make_optimizer(eager, 1e-3, capturable=True), make_optimizer(graphed, 1e-3, capturable=True)
    splits, _ = load_splits(DEFAULT_DATA)
    splits["train"].set_quantization(Q, "linear")
    batches = ChunkBatches(splits["train"], 8, eager.seq_len, eager.overlap, Q, seed=0)
    batches.chunks_per_clip = 10  # a reset every 10 steps
    step, h_e, h_g = None, None, None
    for it in range(100):
        chunk, reset = batches(it)
        chunk = chunk.cuda()
        step = step or GraphedStep(graphed, opt_g, chunk, 1.0, precision)
        if it == 0:
            for a, b in zip(eager.parameters(), graphed.parameters()):
                assert torch.equal(a, b)  # the warm-up was undone
        bits_e, norm_e, h_e = train_step(eager, opt_e, chunk, reset, h_e, 1.0, precision)
        bits_g, norm_g, h_g = step(chunk, reset, h_g)
        # the same kernels on the same inputs: equal to float32 rounding (replays may pick other algorithms)
        assert bits_g.item() == pytest.approx(bits_e.item(), rel=1e-5), it
        assert norm_g.item() == pytest.approx(norm_e.item(), rel=1e-4), it
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_run_with_cuda_graph_resumes(tmp_path, speech_wav):
    """--cuda_graph_step trains, resumes, and ends where an eager run ends (float tolerance)."""
    runs = tmp_path / "runs"
    base = ["--preset", "tiny", "--data", speech_wav, "--runs_dir", str(runs), "--device", "cuda"]
    assert run_main(SCRIPTS["twotier"], base + ["--name", "eager"]) == 0
    assert run_main(SCRIPTS["twotier"], base + ["--name", "graph", "--cuda_graph_step", "--stop_iters", "10"]) == 0
    (graph_run,) = glob.glob(str(runs / "*_graph_*"))
    assert run_main(SCRIPTS["twotier"], ["--resume", graph_run, "--stop_iters", "20"]) == 0
    (eager_run,) = glob.glob(str(runs / "*_eager_*"))
    a = torch.load(os.path.join(eager_run, "checkpoints", "it0000020.pt"), weights_only=False)
    b = torch.load(os.path.join(graph_run, "checkpoints", "it0000020.pt"), weights_only=False)
    assert b["row"]["train_bits"] == pytest.approx(a["row"]["train_bits"], rel=1e-3)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-2, atol=1e-3)


@pytest.fixture
def tf32_restored():
    """The global TF32 flags as they were, whatever the test asserted."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_autocasts_the_mlp_but_runs_the_grus_in_float32(tf32_restored):
    """--precision bf16: autocast's cuDNN-RNN rule would cast the GRUs to float16 (without loss scaling); they run
    in float32, while the linear layers do run in bf16. fp32 turns TF32 off, tf32 on."""
    from lib.layers import GRUStack
    from lib.step import set_precision
    set_precision("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    set_precision("tf32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    gru, lin = GRUStack(4, 16, 2).cuda(), torch.nn.Linear(4, 4).cuda()
    x = torch.randn(3, 5, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        out, h = gru(x, None)
        assert out.dtype == h.dtype == torch.float32
        assert lin(x).dtype == torch.bfloat16  # autocast is on


def test_a_run_made_without_graphs_resumes_with_them_and_back(tmp_path, speech_wav):
    """--cuda_graph_step may change on resume: Adam's capturable flag follows it (else the capture fails)."""
    runs = tmp_path / "runs"
    base = ["--preset", "tiny", "--data", speech_wav, "--runs_dir", str(runs), "--device", "cuda", "--n_samples", "0"]
    assert run_main(SCRIPTS["twotier"], base + ["--stop_iters", "10"]) == 0
    (run,) = glob.glob(str(runs / "*"))
    assert run_main(SCRIPTS["twotier"], ["--resume", run, "--stop_iters", "20", "--cuda_graph_step"]) == 0
    assert run_main(SCRIPTS["twotier"], ["--resume", run, "--stop_iters", "30", "--no_cuda_graph_step"]) == 0
    ckpt = torch.load(os.path.join(run, "checkpoints", "it0000030.pt"), weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["capturable"] is False


def test_a_ddp_training_step_never_waits_for_the_gpu(tmp_path):
    """The step under DistributedDataParallel (one NCCL process: the wrapper and its reducer, as under torchrun)
    makes no host round-trip after warm-up: h0 is outside DDP's buckets, so find_unused_parameters is off."""
    import torch.distributed as tdist
    from lib import dist
    from lib.step import make_optimizer, train_step
    from test_models import small
    tdist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = small(fs=2, n_frames=16).cuda()
        net = dist.wrap(m, torch.device("cuda", torch.cuda.current_device()))
        opt = make_optimizer(m, 1e-3)
        chunks = torch.randint(Q, (8, 4, 2 + 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        h, total = None, 0.0
        for i in range(8):
            if i == 4:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            bits, _, h = train_step(m, opt, chunks[i], i % 2 == 0, h, 1.0, "tf32", net)
            total = total + bits
        torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(total)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        tdist.destroy_process_group()


def test_batches_gathered_on_the_gpu_equal_the_memory_mapped_ones():
    """The splits held on the GPU as uint8 levels give, batch for batch, the memory-mapped path's chunks."""
    from lib import DEFAULT_DATA
    from lib.data import ChunkBatches, eval_chunks, load_splits
    splits, _ = load_splits(DEFAULT_DATA)
    train = splits["train"]
    train.set_quantization(Q, "linear")
    mapped = ChunkBatches(train, 32, 128, 2, Q, seed=123)
    held = ChunkBatches(train.on_device(torch.device("cuda"), Q), 32, 128, 2, Q, seed=123)
    for it in (0, 1, 499, 500, 2501):
        (a, ra), (b, rb) = mapped(it), held(it)
        assert b.is_cuda and ra == rb and torch.equal(a, b.cpu()), it
    valid = splits["valid"]
    valid.set_quantization(Q, "linear")
    for (a, _), (b, _) in zip(eval_chunks(valid, 4, 128, 2, Q, 2048),
                              eval_chunks(valid.on_device(torch.device("cuda"), Q), 4, 128, 2, Q, 2048)):
        assert torch.equal(a, b.cpu())
