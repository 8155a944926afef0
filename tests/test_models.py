"""Every model: shapes, causality, the loss at initialization, sampler == teacher forcing; TBPTT mechanics."""
import copy
import math

import pytest
import torch

from lib import UserError
from lib.data import ChunkBatches, eval_chunks
from lib.quantize import q_zero
from lib.sample import GumbelNoise
from lib.step import chunk_loss, evaluate, train_step
from baseline import FlatGRU
from three_tier import ThreeTier
from two_tier import TwoTier

Q = 256


def small(fs=2, n_frames=8, **kw):
    torch.manual_seed(0)
    return TwoTier(frame_size=fs, n_frames=n_frames, dim=32, n_rnn=2, emb_size=8, q_levels=Q, **kw)


def three(bfs=4, fs=2, seq_len=16):
    torch.manual_seed(0)
    return ThreeTier(big_frame_size=bfs, frame_size=fs, seq_len=seq_len, dim=32, n_rnn=2, emb_size=8, q_levels=Q)


def flat(input="reals", seq_len=16):
    torch.manual_seed(0)
    return FlatGRU(dim=32, n_rnn=2, q_levels=Q, input=input, emb_size=8, seq_len=seq_len)


# every model the repository trains, as (name, factory): the contract tests run on each
MODELS = [("twotier_fs1", lambda: small(fs=1, n_frames=8)), ("twotier_fs2", lambda: small(fs=2, n_frames=4)),
          ("twotier_fs4", lambda: small(fs=4, n_frames=4)), ("baseline_reals", lambda: flat("reals")),
          ("baseline_embed", lambda: flat("embed")), ("threetier_bfs4_fs2", lambda: three(4, 2)),
          ("threetier_bfs8_fs2", lambda: three(8, 2)), ("threetier_bfs4_fs1", lambda: three(4, 1, seq_len=8))]


def test_shapes():
    model = small(fs=4, n_frames=5, ipcost=0.5)
    x = torch.randint(Q, (3, 4 + 20))
    logits, h, aux = model(x)
    assert logits.shape == (3, 20, Q)
    assert h.shape == (2, 3, 32)
    assert aux.shape == () and aux.item() > 0


def test_three_tier_shapes():
    model = three(8, 2, seq_len=24)
    logits, h, aux = model(torch.randint(Q, (3, 8 + 24)))
    assert logits.shape == (3, 24, Q) and h.shape == (4, 3, 32) and aux.item() == 0  # both stacks' 2 layers


@pytest.mark.parametrize("bfs, fs", [(4, 2), (8, 2), (4, 1)])
def test_the_big_tier_sees_only_whole_big_frames_that_ended_before(bfs, fs):
    """The frame tier's input from the big tier for frame k (the `above` it is given) changes with sample p only
    when frame k starts after the big frame that holds p has ended: whole big frames, never a part of one."""
    model = three(bfs, fs, seq_len=4 * bfs).eval()
    T, R = model.seq_len, bfs // fs
    seen = {}
    model.frame_rnn.register_forward_pre_hook(lambda module, args: seen.__setitem__("above", args[2]))
    seq = torch.randint(Q, (2, bfs + T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(seq)
        base = seen["above"]
        for p in range(bfs + T):
            changed = seq.clone()
            changed[:, p] = (changed[:, p] + Q // 2) % Q
            model(changed)
            first = (p // bfs) * R  # frame k starts at BFS + k*FS: the first frame after p's big frame ends
            assert torch.equal(seen["above"][:, :first], base[:, :first]), p
            if first < T // fs:
                assert not torch.allclose(seen["above"][:, first], base[:, first]), p


def test_three_tier_bad_geometry_is_one_line():
    import argparse
    from three_tier import build_model
    flags = dict(big_frame_size=8, frame_size=2, seq_len=512, dim=8, n_rnn=1, emb_size=4, q_levels=Q)
    for change, message in [(dict(big_frame_size=6, frame_size=4), "--big_frame_size 6 must be a multiple of"),
                            (dict(seq_len=100), "--seq_len 100 must be a multiple of --big_frame_size 8"),
                            (dict(frame_size=0), "--frame_size must be at least 1")]:
        with pytest.raises(UserError, match=message):
            build_model(argparse.Namespace(**{**flags, **change}))


def test_baseline_shapes():
    model = flat("embed", seq_len=12)
    logits, h, aux = model(torch.randint(Q, (3, 1 + 12)))
    assert logits.shape == (3, 12, Q) and h.shape == (2, 3, 32) and aux.item() == 0


@pytest.mark.parametrize("name, make", MODELS)
def test_loss_at_init_is_near_uniform(name, make):
    """Near log2(256) = 8 bits: the original init (He into ReLUs, LeCun out) gives logits of variance ~1,
    which costs at most about one bit more than a uniform guess; a scale bug would cost tens of bits."""
    model = make()
    x = torch.randint(Q, (4, model.overlap + 64))
    logits, _, _ = model(x)
    bits = torch.nn.functional.cross_entropy(logits.reshape(-1, Q), x[:, model.overlap:].reshape(-1)).item()
    assert math.log2(Q) <= bits / math.log(2) < math.log2(Q) + 1.5


@pytest.mark.parametrize("name, make", MODELS)
def test_causality_across_a_chunk_boundary(name, make):
    """Changing sample p changes no prediction of a sample <= p, and does change the prediction of p + 1."""
    model = make().eval()
    fs, T = model.overlap, model.seq_len
    seq = torch.randint(Q, (2, fs + 2 * T))

    def all_logits(s):  # two chunks with the hidden state carried, as in training
        l1, h, _ = model(s[:, :fs + T])
        l2, _, _ = model(s[:, T:fs + 2 * T], h)
        return torch.cat([l1, l2], dim=1)  # [:, u] predicts s[:, fs + u]

    with torch.no_grad():
        base = all_logits(seq)
        for p in range(fs, fs + 2 * T):  # every target position of both chunks
            changed = seq.clone()
            changed[:, p] = (changed[:, p] + Q // 2) % Q
            out = all_logits(changed)
            u = p - fs  # out[:, u] predicts the perturbed sample itself
            assert torch.equal(out[:, :u + 1], base[:, :u + 1]), f"prediction of sample <= {p} saw sample {p}"
            if u + 1 < 2 * T:
                assert not torch.allclose(out[:, u + 1], base[:, u + 1]), f"sample {p + 1} ignores sample {p}"


@pytest.mark.parametrize("name, make", MODELS)
def test_the_carried_hidden_state_links_chunks(name, make):
    """A sample of chunk 1 older than the overlap changes chunk 2's predictions, through the carried h alone:
    with h reset at chunk 2 it changes nothing there."""
    model = make().eval()
    fs, T = model.overlap, model.seq_len
    seq = torch.randint(Q, (2, fs + 2 * T), generator=torch.Generator().manual_seed(5))
    changed, p = seq.clone(), min(fs + T // 2, T - 1)  # in chunk 1, not in chunk 2 (it starts at T)
    changed[:, p] = (changed[:, p] + Q // 2) % Q
    with torch.no_grad():
        def chunk2(s, carry):
            _, h, _ = model(s[:, :fs + T])
            return model(s[:, T:fs + 2 * T], h if carry else None)[0]
        assert not torch.allclose(chunk2(seq, True), chunk2(changed, True))
        assert torch.equal(chunk2(seq, False), chunk2(changed, False))


@pytest.mark.parametrize("name, make", MODELS)
def test_sampler_matches_teacher_forcing(name, make):
    """The logits each sample was drawn from == the training forward pass over the sampled sequence."""
    model = make().eval()
    samples, logits = model.generate(3, 37, GumbelNoise(3, Q, 5, "cpu"), keep_logits=True)
    assert samples.shape == (3, 37) and logits.shape == (3, 37, Q)
    assert samples.min() >= 0 and samples.max() < Q
    # the clip-start padding, the samples, then padding up to whole frames (those logits are not compared)
    padded = torch.cat([torch.full((3, model.overlap), q_zero(Q)), samples, torch.full((3, 3), q_zero(Q))], dim=1)
    with torch.no_grad():
        forced, _, _ = model(padded[:, :model.overlap + 40])
    torch.testing.assert_close(forced[:, :37], logits, atol=1e-4, rtol=1e-4)


def test_chunks_overlap_and_reset_flags():
    levels = torch.randint(Q, (5, 100))
    batches = ChunkBatches(levels, 2, seq_len=24, overlap=4, q_levels=Q, seed=0)
    assert batches.chunks_per_clip == 4  # 100 // 24; the last 4 samples are never a target
    seen = []
    for group in range(batches.batches_per_epoch):
        chunks = [batches(group * 4 + k) for k in range(4)]
        assert [reset for _, reset in chunks] == [True, False, False, False]
        assert (chunks[0][0][:, :4] == q_zero(Q)).all()
        for (prev, _), (cur, _) in zip(chunks, chunks[1:]):
            assert cur.shape == (2, 28)
            assert torch.equal(cur[:, :4], prev[:, -4:])  # FS samples of overlap
        targets = torch.cat([c[:, 4:] for c, _ in chunks], dim=1)
        rows = [int((levels[:, :96] == t).all(dim=1).nonzero()) for t in targets]
        seen += rows
    assert len(set(seen)) == len(seen) == 4  # one epoch: distinct clips, without replacement


def test_fewer_clips_than_batch_size_still_batches():
    levels = torch.randint(Q, (3, 64))
    batches = ChunkBatches(levels, 8, seq_len=32, overlap=2, q_levels=Q, seed=0)
    assert batches.with_replacement
    chunk, reset = batches(0)
    assert chunk.shape == (8, 34) and reset


def test_clip_shorter_than_a_chunk_is_refused():
    with pytest.raises(UserError, match="shorter than one training chunk"):
        ChunkBatches(torch.randint(Q, (3, 20)), 2, seq_len=32, overlap=2, q_levels=Q, seed=0)


def test_train_step_resets_to_h0_at_a_clip_start():
    model = small()
    chunk = torch.randint(Q, (2, 2 + 16))
    garbage = torch.randn(2, 2, 32)
    results = []
    for h in (None, garbage):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        bits, grad_norm, h_after = train_step(m, opt, chunk, True, h, 1.0)
        results.append((bits, grad_norm, h_after, [p.detach().clone() for p in m.parameters()]))
    assert results[0][:2] == results[1][:2]
    assert torch.equal(results[0][2], results[1][2])
    assert all(torch.equal(a, b) for a, b in zip(results[0][3], results[1][3]))
    # without a reset the carried state matters
    m = copy.deepcopy(model)
    bits, _, _ = train_step(m, torch.optim.Adam(m.parameters()), chunk, False, garbage, 1.0)
    assert bits != results[0][0]


def test_evaluation_resets_between_clips_and_covers_whole_chunks():
    model = small().eval()
    levels = torch.randint(Q, (3, 70))  # 4 whole chunks of 16 per clip; 6 samples never predicted
    together = evaluate(model, levels, batch_size=1, device="cpu")
    alone = [evaluate(model, levels[i:i + 1], batch_size=3, device="cpu") for i in range(3)]
    assert together == pytest.approx(sum(alone) / 3, rel=1e-6)
    n_targets = sum(c.shape[0] * (c.shape[1] - 2) for c, _ in eval_chunks(levels, 2, 16, 2, Q, 48))
    assert n_targets == 3 * 64
    # evaluation walks longer chunks than training; with h carried, the predictions are the same
    total, h = 0.0, None
    with torch.no_grad():
        for chunk, reset in eval_chunks(levels, 3, 16, 2, Q, 16):  # training-sized chunks
            nll, _, h = chunk_loss(model, chunk, None if reset else h)
            total += nll.item() * chunk.shape[0] * 16
    assert together == pytest.approx(total / (3 * 64) / math.log(2), rel=1e-6)


def test_sync_free_step_equals_the_plain_step():
    """The training step that keeps its sums on the device (fused Adam, one foreach norm) gives the losses, grad
    norms and parameters of the plain step it replaced (per-parameter norms, plain Adam), to float tolerance."""
    from lib.step import make_optimizer
    plain_model = small()
    fast_model = copy.deepcopy(plain_model)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    fast_opt = make_optimizer(fast_model, 1e-3)
    g = torch.Generator().manual_seed(0)
    h_plain = h_fast = None
    for step in range(6):
        chunk = torch.randint(Q, (3, 2 + 16), generator=g)
        reset = step % 3 == 0
        if reset:
            h_plain = None
        nll, aux, h_plain = chunk_loss(plain_model, chunk, h_plain)
        plain_opt.zero_grad()
        (nll + aux).backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in
                                                     plain_model.parameters() if p.grad is not None]))
        torch.nn.utils.clip_grad_value_(plain_model.parameters(), 0.5)
        plain_opt.step()
        h_plain = h_plain.detach()
        bits, grad_norm, h_fast = train_step(fast_model, fast_opt, chunk, reset, h_fast, 0.5)
        assert bits.dtype == torch.float64 and bits.item() == pytest.approx(nll.item() / math.log(2), rel=1e-5)
        assert grad_norm.item() == pytest.approx(norm.item(), rel=1e-4)
    for a, b in zip(plain_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fs", [1, 2, 4])
def test_first_layer_as_tables_equals_the_product(fs):
    """The MLP's first layer as per-position tables (FS lookups and a sum) gives the logits, loss and gradients of
    Embedding then Linear, in float64 to rounding, and the same parameters after training steps in float32."""
    product = small(fs=fs, n_frames=4, ipcost=0.5).double()
    tables = copy.deepcopy(product)
    product.sample_mlp.use_tables, tables.sample_mlp.use_tables = False, True
    x = torch.randint(Q, (3, fs + 4 * fs), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (product, tables):
        nll, aux, _ = chunk_loss(model, x, None)
        (nll + aux).backward()
        losses.append(nll.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for (name, a), b in zip(product.named_parameters(), tables.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    from lib.step import make_optimizer
    product, tables = product.float(), tables.float()
    opts = [make_optimizer(m, 1e-3) for m in (product, tables)]
    h = [None, None]
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        chunk = torch.randint(Q, (3, fs + 4 * fs), generator=g)
        results = [train_step(m, o, chunk, step == 0, hh, 1.0) for m, o, hh in zip((product, tables), opts, h)]
        h = [r[2] for r in results]
        assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-5)
    for a, b in zip(product.parameters(), tables.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tables_are_the_default_on_the_cpu():
    model = small()
    assert model.sample_mlp.use_tables is None
    x = torch.randint(Q, (2, 2 + 8))
    logits, _, _ = model(x)
    model.sample_mlp.use_tables = True
    assert torch.equal(model(x)[0], logits)  # the same computation, bit for bit
