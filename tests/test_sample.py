"""Sampling: the fast path equals the reference, determinism, a stored regression, and generate.py."""
import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from baseline import FlatGRU, main as baseline_main
from conftest import RATE, REPO, run_main
from generate import main as generate_main
from lib.sample import BACKENDS, generate
from three_tier import ThreeTier, main as three_tier_main
from two_tier import TwoTier, main as two_tier_main

Q = 256
# test_primed_sampling_at_temperature_0_6_is_as_recorded: the first 12 levels of each sequence, and the sum of all
RECORDED_T06 = [[141, 42, 193, 70, 212, 246, 172, 15, 109, 241, 74, 121],
                [229, 193, 69, 228, 1, 109, 160, 224, 34, 135, 134, 86]]
RECORDED_T06_SUM = 10786


def model(kind, dtype=torch.float64):
    torch.manual_seed(0)
    if kind.startswith("twotier"):
        m = TwoTier(frame_size=int(kind[-1]), n_frames=4, dim=32, n_rnn=2, emb_size=8, q_levels=Q)
    elif kind.startswith("threetier"):  # threetier_bfs4_fs2
        bfs, fs = (int(part[-1]) for part in kind.split("_")[1:])
        m = ThreeTier(big_frame_size=bfs, frame_size=fs, seq_len=4 * bfs, dim=32, n_rnn=2, emb_size=8, q_levels=Q)
    else:
        m = FlatGRU(dim=32, n_rnn=2, q_levels=Q, input=kind.split("_")[1], emb_size=8, seq_len=16)
    return m.to(dtype).eval()


KINDS = ["twotier_fs1", "twotier_fs2", "twotier_fs3", "baseline_reals", "baseline_embed", "threetier_bfs4_fs2",
         "threetier_bfs8_fs2", "threetier_bfs4_fs1"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature, primed", [(1.0, False), (0.6, True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_reference(kind, temperature, primed, backend):
    """Same seed -> exactly the same integer samples, from the fast step compiled, on numpy and on torch (as on a
    GPU). In float64, so that the paths' different (but equally correct) rounding cannot move a Gumbel argmax."""
    m = model(kind)
    prime = torch.randint(Q, (23,), generator=torch.Generator().manual_seed(3)) if primed else None
    ref = generate(m, 3, 77, seed=11, temperature=temperature, prime=prime, fast=False)
    fast = generate(m, 3, 77, seed=11, temperature=temperature, prime=prime, fast=True, backend=backend)
    assert ref.shape == fast.shape == (3, 77)
    assert torch.equal(ref, fast)
    assert not torch.equal(fast, generate(m, 3, 77, seed=12, temperature=temperature, prime=prime))


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test (the compiled step takes as many threads), then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["twotier_fs2", "twotier_fs3", "baseline_reals", "threetier_bfs4_fs2"])
@pytest.mark.parametrize("threads", [2, 3])
def test_compiled_step_on_several_threads_equals_reference(kind, threads, torch_threads):
    """Each thread computes its share of every product's columns, between barriers (lib/kernels.py): with 2
    threads, and with 3, whose shares of 32 units are unequal, the samples and logits are the reference's,
    and in float32 bit for bit those of one thread."""
    m = model(kind)
    prime = torch.randint(Q, (23,), generator=torch.Generator().manual_seed(3))
    ref, ref_logits = generate(m, 3, 77, seed=11, temperature=0.6, prime=prime, fast=False, record=True)
    torch_threads(threads)
    levels, logits = generate(m, 3, 77, seed=11, temperature=0.6, prime=prime, backend="numba", record=True)
    assert torch.equal(ref, levels)
    torch.testing.assert_close(logits, ref_logits)
    assert torch.get_num_threads() == threads  # generate() gives torch its threads back
    # each output is summed in the same order whichever thread computes it: float32 is bit-identical too
    m32 = model(kind, torch.float32)
    several = generate(m32, 3, 77, seed=11, prime=prime, backend="numba", record=True)
    torch_threads(1)
    one = generate(m32, 3, 77, seed=11, prime=prime, backend="numba", record=True)
    assert torch.equal(several[0], one[0]) and torch.equal(several[1], one[1])


def test_compiled_gate_tanh_is_accurate():
    """The compiled GRU gates' tanh: libm's, to the bit, in float64 (the equality tests rest on it); in float32 a
    rational approximation within 5 ulp of tanh everywhere, odd, and never beyond +-1."""
    from numba import njit
    from lib.kernels import gate_tanh

    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = gate_tanh(x[i])
        return out

    x64 = np.concatenate([np.linspace(-20, 20, 400_001), np.random.default_rng(0).standard_normal(100_000) * 3,
                          [0.0, 1e-30, 3.9e-4, 4.1e-4, np.inf, -np.inf]])
    assert apply(x64).tolist() == [math.tanh(v) for v in x64]  # the C library's
    x = x64.astype(np.float32)
    got, exact = apply(x).astype(np.float64), np.tanh(x.astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32))
    assert ulps.max() <= 5 and ulps.mean() < 1.5
    assert np.array_equal(apply(-x), -apply(x))
    assert np.abs(got).max() <= 1  # a GRU's state stays within [-1, 1]


def test_compiled_step_threads_stop(torch_threads):
    """A sampler's worker threads end when it is closed, and when it is dropped without being closed."""
    import gc
    import threading
    torch_threads(2)
    before = threading.active_count()
    sampler = model("twotier_fs2").fast_sampler(2, backend="numba")
    assert threading.active_count() == before + 1
    sampler.step(np.zeros((2, sampler.step_len, Q)))
    sampler.close()
    assert threading.active_count() == before
    sampler = model("baseline_reals").fast_sampler(2, backend="numba")
    assert threading.active_count() == before + 1
    del sampler
    gc.collect()
    assert threading.active_count() == before


@pytest.mark.parametrize("kind", KINDS[1::2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_recorded_logits_are_the_first_sequences(kind, backend):
    m = model(kind)
    levels, logits = generate(m, 2, 30, seed=1, record=True, backend=backend)
    ref_levels, ref_logits = generate(m, 2, 30, seed=1, record=True, fast=False)
    assert torch.equal(levels, ref_levels) and logits.shape == (30, Q)
    torch.testing.assert_close(logits, ref_logits)


# The first samples of small fixed-seed models. If a change alters sampling, this fails loudly: update the
# numbers only for a change that is meant to alter sampling, and say so in the commit.
REGRESSION = {
    "twotier_fs2": [[136, 151, 221, 80, 143, 69, 213, 3, 221, 154, 220, 131, 172, 92, 153, 112],
                    [93, 84, 203, 254, 184, 179, 122, 229, 202, 61, 228, 77, 74, 36, 23, 145]],
    "baseline_embed": [[136, 151, 221, 80, 143, 87, 213, 248, 209, 154, 220, 123, 226, 184, 102, 138],
                       [96, 196, 113, 214, 184, 87, 122, 9, 207, 61, 228, 77, 74, 36, 231, 145]],
    "threetier_bfs4_fs2": [[44, 110, 221, 80, 143, 87, 213, 248, 209, 154, 220, 142, 133, 184, 102, 112],
                           [235, 196, 113, 214, 184, 179, 122, 162, 207, 61, 228, 77, 74, 36, 231, 145]],
}


@pytest.mark.parametrize("kind", sorted(REGRESSION))
def test_sampling_regression(kind):
    got = generate(model(kind), 2, 16, seed=2024)
    assert got.tolist() == REGRESSION[kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, speech_wav):
    """A tiny trained run of each model."""
    made = {}
    for name, main in (("twotier", two_tier_main), ("baseline", baseline_main), ("threetier", three_tier_main)):
        runs_dir = tmp_path_factory.mktemp(name)
        assert run_main(main, ["--preset", "tiny", "--data", speech_wav, "--runs_dir", str(runs_dir),
                               "--n_samples", "0"]) == 0
        made[name] = glob.glob(str(runs_dir / "*"))[0]
    return made


@pytest.mark.parametrize("name", ["twotier", "baseline", "threetier"])
def test_generate_writes_bit_identical_files(tmp_path, runs, name, speech_wav, capsys):
    for out, threads in (("a", "2"), ("b", "1")):  # the compiled step's bits do not depend on its threads
        assert run_main(generate_main, [runs[name], "--n", "3", "--batch", "2", "--secs", "0.1", "--out",
                                        str(tmp_path / out), "--plot_softmax", "--threads", threads]) == 0
    files = sorted(os.listdir(tmp_path / "a"))
    wavs = ["seed0_temp1_000.wav", "seed0_temp1_001.wav", "seed0_temp1_002.wav"]
    assert files == sorted(wavs + [w[:-4] + ".png" for w in wavs] + ["index.html", "seed0_temp1_softmax.png"])
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    audio, rate = sf.read(tmp_path / "a" / wavs[0])
    assert rate == RATE and len(audio) == 800
    assert "samples/s" in capsys.readouterr().out
    # every fast backend writes valid audio of the same length (not the same bits: float32 rounds differently)
    for backend in ("numba", "numpy", "torch"):
        assert run_main(generate_main, [runs[name], "--n", "1", "--secs", "0.1", "--backend", backend, "--out",
                                        str(tmp_path / backend)]) == 0
        assert len(sf.read(tmp_path / backend / wavs[0])[0]) == 800
    # another seed, other audio
    assert run_main(generate_main, [runs[name], "--n", "1", "--secs", "0.1", "--seed", "1", "--out",
                                    str(tmp_path / "c")]) == 0
    assert sf.read(tmp_path / "c" / "seed1_temp1_000.wav")[0].tolist() != audio.tolist()


def test_generate_from_a_checkpoint_with_a_prime_at_another_rate(tmp_path, runs, speech_wav, capsys):
    audio, _ = sf.read(speech_wav)
    prime16k = tmp_path / "prime16k.wav"
    sf.write(prime16k, np.repeat(audio[:800], 2), 16000)  # 0.1 s at 16 kHz
    ckpt = sorted(glob.glob(os.path.join(runs["twotier"], "checkpoints", "*.pt")))[-1]
    assert run_main(generate_main, [ckpt, "--n", "1", "--secs", "0.05", "--prime", str(prime16k), "--out",
                                    str(tmp_path / "out")]) == 0
    assert "resampled" in capsys.readouterr().out
    written, rate = sf.read(tmp_path / "out" / "prime16k_seed0_temp1_000.wav")  # named after the prime
    assert rate == RATE and len(written) == 800 + 400  # the prime, then the continuation
    # the prime's content: the 16 kHz file resampled to the run's rate and quantized as the run's data (linear,
    # 256 levels), to the 16-bit WAV's rounding; and it is still the speech it came from
    import soxr
    from lib.quantize import dequantize, quantize
    x16, _ = sf.read(prime16k, dtype="float32")
    expected = dequantize(quantize(torch.from_numpy(soxr.resample(x16, 16000, RATE, quality="HQ"))), 256).numpy()
    assert np.abs(written[:800] - expected).max() <= 1 / 32768
    assert np.corrcoef(written[:800], audio[:800])[0, 1] > 0.9


def test_generate_never_overwrites_without_overwrite(tmp_path, runs, speech_wav, capsys):
    """An unprimed and a primed run write different files; the same command again is refused (one line, exit 2,
    files untouched) unless --overwrite is given."""
    out = str(tmp_path / "out")
    flags = ["--n", "1", "--secs", "0.05", "--out", out, "--plot_softmax"]
    capsys.readouterr()
    assert run_main(generate_main, [runs["twotier"], *flags]) == 0
    newest = sorted(glob.glob(os.path.join(runs["twotier"], "checkpoints", "it*.pt")))[-1]
    iteration = int(os.path.basename(newest)[2:9])
    said = capsys.readouterr().out  # which checkpoint, and every file written
    assert f"sampled from {newest} (iteration {iteration}); wrote 1 WAV files and seed0_temp1_softmax.png" in said
    assert run_main(generate_main, [runs["twotier"], *flags, "--prime", speech_wav]) == 0
    files = sorted(os.listdir(out))
    assert files == ["index.html", "seed0_temp1_000.png", "seed0_temp1_000.wav", "seed0_temp1_softmax.png",
                     "speech_seed0_temp1_000.png", "speech_seed0_temp1_000.wav", "speech_seed0_temp1_softmax.png"]
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in files}
    capsys.readouterr()
    assert run_main(generate_main, [runs["twotier"], *flags, "--temperature", "1.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed0_temp1_000.wav exists" in err[0] and "--overwrite" in err[0]
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in files} == before
    assert run_main(generate_main, [runs["twotier"], *flags, "--overwrite"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["NOTARUN"], "not a run folder"),
    (["JUNK"], "not a checkpoint"),
    (["OTHER"], "unknown kind"),
    (["RUN", "--n", "0"], "--n"),
    (["RUN", "--secs", "-1"], "--secs"),
    (["RUN", "--temperature", "0"], "--temperature"),
    (["RUN", "--prime", "SHORT"], "fewer than one frame"),
    (["RUN", "--threads", "-1"], "--threads"),
    (["RUN", "--secs", "inf"], "--secs must be a positive number of at most 86400"),
    (["RUN", "--secs", "1e12"], "--secs must be a positive number of at most 86400"),
    (["RUN", "--plot_softmax", "--plot_secs", "nan"], "--plot_secs"),
    (["RUN", "--n", "100000000"], "at most 100,000 files per call"),
])
def test_generate_bad_input(tmp_path, runs, capsys, flags, message):
    os.makedirs(tmp_path / "NOTARUN")
    (tmp_path / "JUNK").write_bytes(b"not a checkpoint")
    torch.save({"model_id": "wavenet", "settings": {}}, tmp_path / "OTHER")
    sf.write(tmp_path / "SHORT.wav", np.zeros(1) + 0.1, RATE)
    paths = {"NOTARUN": tmp_path / "NOTARUN", "JUNK": tmp_path / "JUNK", "OTHER": tmp_path / "OTHER",
             "RUN": runs["twotier"], "SHORT": tmp_path / "SHORT.wav"}
    argv = [str(paths.get(f, f)) for f in flags] + ["--out", str(tmp_path / "out")]
    assert run_main(generate_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_flags", [["--model", "twotier", "--frame_size", "2"], ["--model", "baseline"]])
def test_bench_prints_both_paths_and_the_limit(capsys, model_flags):
    from bench import main as bench_main
    bench_main(["generate", *model_flags, "--dim", "16", "--n_rnn", "1", "--batch", "1", "16", "--secs", "0.01",
                "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quick CPU run: 0.01 s of audio per measurement, best of 1")  # says what it does
    lines = lines[1:]
    rows = [line for line in lines if line.startswith("batch")]
    assert len(rows) == 2 and all("reference" in r and "numpy" in r and "torch" in r for r in rows)
    assert "fast* numba" in rows[0] and "fast* torch" in rows[1]  # the path generate.py takes on the CPU
    assert all("achieved / limit" in r and "weights read at" in r for r in rows)
    assert "MFLOP per generated sample" in lines[1] and "MB of weights per sample" in lines[2]
    assert "read-bound limit" in lines[2] and "achieved / read-bound limit" in rows[0]  # batch 1 only
    assert "read-bound" not in rows[1]
    # a line as each path is timed, before its batch's summary: never silent for minutes
    progress = [i for i, line in enumerate(lines) if line.startswith("  batch 1: reference, round 1 of 1")]
    assert progress and progress[0] < lines.index(rows[0])


def test_bench_on_the_cpu_stops_on_ctrl_c_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "bench.py", "generate", "--dim", "256", "--batch", "1", "--secs", "60"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the reference of a minute of audio: long enough to be stopped in
        lines.append(line)
        if "warming up reference" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == "interrupted; the measurements printed above are complete"


def test_temperature_draws_from_softmax_of_logits_over_t():
    """The independent oracle for every path's draw: at T = 0.6 the frequencies of 200,000 draws match
    softmax(logits / T) (and not softmax(logits * T)) within 4 standard errors, for a fixed seed."""
    from lib.sample import GumbelNoise, draw
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -0.5])
    n, T = 200_000, 0.6
    noise = GumbelNoise(1, len(logits), 7, "cpu", torch.float64).take(n)[0]  # one sequence's n steps: (n, Q)
    counts = torch.bincount(draw(logits.double()[None], noise, T), minlength=len(logits)).double()
    want = torch.softmax(logits.double() / T, 0)
    se = (want * (1 - want) / n).sqrt()
    assert ((counts / n - want).abs() <= 4 * se).all(), (counts / n, want)
    wrong = torch.softmax(logits.double() * T, 0)
    assert ((counts / n - wrong).abs() > 10 * se).any()


def test_primed_sampling_at_temperature_0_6_is_as_recorded():
    """A regression case for the reference sampler (float64, a fixed model and seed), primed, at T = 0.6: the
    levels recorded when the oracle above held. A change in the prime's handling or the temperature shows."""
    m = model("twotier_fs2")
    prime = torch.randint(Q, (23,), generator=torch.Generator().manual_seed(3))
    out = generate(m, 2, 40, seed=11, temperature=0.6, prime=prime, fast=False)
    assert out[:, :12].tolist() == RECORDED_T06 and int(out.sum()) == RECORDED_T06_SUM


def primed_on_every_row(m, n, prime):
    """The state a prime leaves, computed as before on all n rows (the whole model for three tiers) -> h."""
    with torch.no_grad():
        if isinstance(m, FlatGRU):
            x = torch.cat([torch.full((n, 1), Q // 2), prime.expand(n, -1)], dim=1)
            return m.rnn(m.step_inputs(x[:, :-1]), m.rnn.initial_state(n))[1]
        if isinstance(m, TwoTier):
            fs = m.frame_size
            x = torch.cat([torch.full((n, fs), Q // 2), prime[len(prime) % fs:].expand(n, -1)], dim=1)
            return m.frame_rnn(x[:, :-fs].reshape(n, -1, fs), m.frame_rnn.rnn.initial_state(n))[2]
        bfs = m.big_frame_size
        x = torch.cat([torch.full((n, bfs), Q // 2), prime[len(prime) % bfs:].expand(n, -1)], dim=1)
        return m(x, torch.cat([m.big_rnn.rnn.initial_state(n), m.frame_rnn.rnn.initial_state(n)]))[1]


@pytest.mark.parametrize("kind", ["twotier_fs2", "baseline_reals", "baseline_embed", "threetier_bfs4_fs2"])
def test_priming_runs_the_recurrent_tiers_on_one_row_and_never_the_output(kind):
    """At --batch 64 with a 2 s prime, running the sample-level MLP over every row took gigabytes: the prime's
    state is the recurrent tiers' on one row, expanded; it equals the state computed on every row (float64)."""
    m, n = model(kind), 5
    prime = torch.randint(Q, (37,), generator=torch.Generator().manual_seed(5))
    rows, output = [], []
    rnns = [mod for mod in m.modules() if type(mod).__name__ == "GRUStack"]
    hooks = [r.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0])) for r in rnns]
    head = m.out if isinstance(m, FlatGRU) else m.sample_mlp
    hooks.append(head.register_forward_hook(lambda *a: output.append(1)))
    with torch.no_grad():
        h, last = m.prime_state(n, prime)
    for hook in hooks:
        hook.remove()
    assert rows and set(rows) == {1} and not output
    assert h.shape[1] == n and last.shape[0] == n and h.is_contiguous()
    # the same numbers up to float64 rounding (a GEMM over 1 row and over n rows may sum in another order)
    torch.testing.assert_close(h, primed_on_every_row(m, n, prime), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(row, last[0]) for row in last)


@pytest.mark.parametrize("kind", ["twotier_fs2", "threetier_bfs4_fs2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_reference_without_the_first_relu(kind, backend):
    """--mlp_first_relu off (as the ICLR-2017 release) and --frame_init he: every fast path follows the model."""
    torch.manual_seed(0)
    if kind.startswith("twotier"):
        m = TwoTier(frame_size=2, n_frames=4, dim=32, n_rnn=2, emb_size=8, q_levels=Q, first_relu=False,
                    frame_init="he")
    else:
        m = ThreeTier(big_frame_size=4, frame_size=2, seq_len=16, dim=32, n_rnn=2, emb_size=8, q_levels=Q,
                      first_relu=False, frame_init="he")
    m = m.double().eval()
    prime = torch.randint(Q, (23,), generator=torch.Generator().manual_seed(3))
    ref, ref_logits = generate(m, 3, 77, seed=11, temperature=0.6, prime=prime, fast=False, record=True)
    fast, logits = generate(m, 3, 77, seed=11, temperature=0.6, prime=prime, backend=backend, record=True)
    assert torch.equal(ref, fast)
    torch.testing.assert_close(logits, ref_logits)
    with_relu = m.sample_mlp.first_relu = True  # the flag matters: the same weights sample otherwise with it
    assert with_relu and not torch.equal(generate(m, 3, 77, seed=11, temperature=0.6, prime=prime, fast=False), ref)
