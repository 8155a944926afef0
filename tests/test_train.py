"""Training end to end through both scripts: run folders, determinism, exact resume, overfitting, bad input."""
import glob
import json
import os
import re

import pytest
import soundfile as sf
import torch

from conftest import RATE, run_main
from lib.run import Run
from baseline import main as baseline_main
from generate import main as generate_main
from three_tier import main as three_tier_main
from two_tier import main as two_tier_main

LOSS_KEYS = ("iteration", "train_bits", "valid_bits", "grad_norm")
SCRIPTS = {"twotier": two_tier_main, "baseline": baseline_main, "threetier": three_tier_main}
both = every = pytest.mark.parametrize("model", sorted(SCRIPTS))


def train(tmp_path, data, *flags, runs="runs", model="twotier"):
    runs_dir = str(tmp_path / runs)
    code = run_main(SCRIPTS[model], ["--preset", "tiny", "--data", data, "--runs_dir", runs_dir, *flags])
    assert code == 0
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    return run_dir


def losses(run_dir):
    return [{k: r[k] for k in LOSS_KEYS} for r in Run(run_dir).metrics()]


def final_params(run_dir):
    ckpt = torch.load(sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")))[-1], weights_only=False)
    return ckpt["model"], ckpt["state"]["iteration"]


@both
def test_run_folder_holds_everything(tmp_path, speech_wav, model):
    run_dir = train(tmp_path, speech_wav, "--name", "smoke", model=model)
    assert os.path.basename(run_dir).startswith(f"{model}_smoke_")
    settings = json.load(open(os.path.join(run_dir, "settings.json")))
    assert settings["settings"]["dim"] == 32 and settings["parameters"] > 0
    assert {"revision", "dirty"} <= set(settings["git"]) and settings["versions"]["torch"]
    rows = Run(run_dir).metrics()
    assert [r["iteration"] for r in rows] == [10, 20]
    assert {"train_secs", "wall_secs", "train_bits", "valid_bits", "grad_norm", "samples_per_sec"} <= set(rows[0])
    assert "test_bits" in rows[-1] and "test_bits" not in rows[0]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best.pt", "it0000010.pt", "it0000020.pt"]
    wavs = sorted(glob.glob(os.path.join(run_dir, "samples", "*.wav")))
    assert len(wavs) == 4
    info = sf.info(wavs[0])
    assert info.samplerate == RATE and info.frames == RATE // 4
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000
    assert "iter      20" in open(os.path.join(run_dir, "log.txt")).read()


@both
def test_same_seed_same_log_other_seed_other_log(tmp_path, speech_wav, model):
    a = train(tmp_path, speech_wav, runs="a", model=model)
    b = train(tmp_path, speech_wav, runs="b", model=model)
    c = train(tmp_path, speech_wav, "--seed", "7", runs="c", model=model)
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    wav = "samples/it0000020_0.wav"
    assert open(os.path.join(a, wav), "rb").read() == open(os.path.join(b, wav), "rb").read()


@both
def test_resume_continues_exactly(tmp_path, speech_wav, model):
    """N + M iterations straight == N, stop, resume, M: identical parameters and logged losses."""
    straight = train(tmp_path, speech_wav, "--stop_iters", "30", runs="straight", model=model)
    split = train(tmp_path, speech_wav, "--stop_iters", "10", runs="split", model=model)  # stops inside a clip
    assert run_main(SCRIPTS[model], ["--resume", split, "--stop_iters", "30"]) == 0
    assert losses(straight) == losses(split)
    (p_straight, it_a), (p_split, it_b) = final_params(straight), final_params(split)
    assert it_a == it_b == 30
    assert all(torch.equal(p_straight[k], p_split[k]) for k in p_straight)
    assert "resuming" in open(os.path.join(split, "log.txt")).read()


def test_training_never_draws_from_the_global_rng(tmp_path, speech_wav, monkeypatch):
    """Why checkpoints hold no global RNG state: after the model's initialization nothing draws from it (the data
    order, the evaluation and the samples have generators of their own). A run whose global RNG is reseeded to
    another state before every step logs the same losses, writes the same samples and ends with the same weights."""
    import itertools
    import lib.train
    # 10 clips of 0.1 s, batches of 8: a new epoch (a new permutation of the clips) every 25 iterations
    flags = ["--clip_secs", "0.1", "--stop_iters", "60", "--print_iters", "20"]
    plain = train(tmp_path, speech_wav, *flags, runs="plain")
    step, seeds = lib.train.train_step, itertools.count(1000)

    def scrambled(*args, **kw):
        torch.manual_seed(next(seeds))
        return step(*args, **kw)
    monkeypatch.setattr(lib.train, "train_step", scrambled)
    mixed = train(tmp_path, speech_wav, *flags, runs="mixed")
    assert losses(plain) == losses(mixed)
    (a, _), (b, _) = final_params(plain), final_params(mixed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    samples = sorted(os.listdir(os.path.join(plain, "samples")))
    assert samples and all(open(os.path.join(plain, "samples", f), "rb").read() ==
                           open(os.path.join(mixed, "samples", f), "rb").read() for f in samples)


def test_a_relative_data_path_is_recorded_whole(tmp_path, speech_wav, monkeypatch):
    """--data as typed in one folder: the run records the whole path, so resuming (and the report) from any other
    folder still finds the audio."""
    monkeypatch.chdir(os.path.dirname(speech_wav))
    run = train(tmp_path, os.path.basename(speech_wav), "--stop_iters", "2", "--n_samples", "0")
    assert json.load(open(os.path.join(run, "settings.json")))["settings"]["data"] == speech_wav
    monkeypatch.chdir(tmp_path)
    assert run_main(SCRIPTS["twotier"], ["--resume", run, "--stop_iters", "4", "--n_samples", "0"]) == 0


def test_tiny_model_overfits_half_a_second_of_speech(tmp_path, half_second_wav):
    """(measured: 0.48 valid bits at iteration 600, 0.30 at 900)"""
    run_dir = train(tmp_path, half_second_wav, "--frame_size", "4", "--n_frames", "64", "--dim", "128",
                    "--batch_size", "1", "--lr", "5e-3", "--stop_iters", "900", "--print_iters", "300",
                    "--n_samples", "0")
    rows = Run(run_dir).metrics()
    assert rows[0]["train_bits"] > 2.5
    assert rows[-1]["valid_bits"] < 0.6, rows  # valid = the same recording, evaluated in eval mode


def test_three_tier_overfits_half_a_second_of_speech(tmp_path, half_second_wav):
    """As the baseline's test below: the recording cut into 7 clips of 512 samples, all in one batch, one chunk
    each (measured: 0.73 valid bits at iteration 100, 0.14 at 200)."""
    run_dir = train(tmp_path, half_second_wav, "--clip_secs", "0.064", "--seq_len", "512", "--batch_size", "8",
                    "--dim", "128", "--lr", "5e-3", "--stop_iters", "100", "--print_iters", "50", "--valid_clips",
                    "0", "--n_samples", "0", model="threetier")
    rows = Run(run_dir).metrics()
    assert rows[0]["train_bits"] > 1.5
    assert rows[-1]["valid_bits"] < 1.0, rows  # valid = the same recording, evaluated in eval mode


@pytest.mark.parametrize("input, wav, flags", [
    ("embed", "half_second_wav", ["--dim", "256", "--clip_secs", "0.03125", "--seq_len", "250", "--batch_size", "16",
                                  "--lr", "5e-3", "--stop_iters", "100"]),
    ("reals", "quarter_second_wav", ["--dim", "128", "--clip_secs", "0.015625", "--seq_len", "125", "--batch_size",
                                     "16", "--n_rnn", "2", "--lr", "6e-3", "--grad_clip", "0.1", "--stop_iters", "300"]),
])
def test_baseline_overfits_speech(tmp_path, request, input, wav, flags):
    """The recording (half a second; a quarter for reals, whose steps learn slower) is cut into short clips, all in
    one batch, and the baseline learns all of it. Sequential GRU steps are what costs on a CPU, so short clips make
    this fast; reals need a smaller step (elementwise gradient clip 0.1) not to diverge at this learning rate
    (measured, valid bits: embed 0.79 at iteration 100; reals on a quarter second at dim 128 and lr 6e-3 1.05 at
    200, 0.52 at 300, in 2/3 of the time dim 256 and lr 3e-3 took for 0.46; at dim 128 and lr 3e-3 1.16 at 300; on
    half a second 1.24 at 300, 0.59 at 400; with one GRU 1.77 at 400)."""
    iters = int(flags[-1])
    run_dir = train(tmp_path, request.getfixturevalue(wav), "--input", input, *flags,
                    "--print_iters", str(iters // 2), "--valid_clips", "0", "--n_samples", "0", model="baseline")
    rows = Run(run_dir).metrics()
    assert rows[0]["train_bits"] > 1.5
    assert rows[-1]["valid_bits"] < 1.0, rows


def test_non_finite_loss_stops_the_run_without_saving(tmp_path, speech_wav):
    """A step size of 1e30 sends the weights to infinity within a few steps: the run stops, names the
    iteration, exits 1, and writes no checkpoint or metrics row from the broken state."""
    runs_dir = str(tmp_path / "runs")
    assert run_main(two_tier_main, ["--preset", "tiny", "--data", speech_wav, "--runs_dir", runs_dir,
                                    "--lr", "1e30"]) == 1
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    assert "error: non-finite train NLL" in open(os.path.join(run_dir, "log.txt")).read()
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert Run(run_dir).metrics() == []


def snapshot(folder):
    return sorted((p, os.path.getsize(p), os.path.getmtime(p)) for p in glob.glob(f"{folder}/**", recursive=True))


@pytest.mark.parametrize("flags, message", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--data", "EMPTY"], "not a prepared dataset"),
    (["--data", "NOAUDIO"], "none of the"),
    (["--seq_len", "33"], "multiple of --frame_size"),
    (["--q_levels", "255"], "q_levels"),
    (["--n_frames", "0"], "--n_frames"),
    (["--n_frames", "5000"], "shorter than one training chunk"),
    (["--batch_size", "0"], "--batch_size"),
    (["--resume", "NOTARUN"], "not a run folder"),
    (["--sample_secs", "1e7"], "--sample_secs 10000000.0 is more than 3,600"),  # checked at start, not at the interval
    (["--threads", "100000"], "--threads 100000 is more than 1,024"),  # segfaulted in libgomp
    (["--seed", str(2 ** 70)], "seeds are 32-bit"),  # a ValueError from torch
    (["--name", "a/b"], "--name 'a/b': use letters"),  # nested the run folder
    (["--name", "../outside"], "--name '../outside': use letters"),  # outside --runs_dir
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, speech_wav, capsys, flags, message):
    for name in ("EMPTY", "NOAUDIO/train", "NOAUDIO/valid", "NOAUDIO/test", "NOTARUN"):
        os.makedirs(tmp_path / name)
    for split in ("train", "valid", "test"):
        (tmp_path / "NOAUDIO" / split / "x.wav").write_bytes(b"not audio")
    flags = [str(tmp_path / f) if f in ("EMPTY", "NOAUDIO", "NOTARUN") else f for f in flags]
    before = snapshot(tmp_path)
    code = run_main(two_tier_main, ["--preset", "tiny", "--data", speech_wav, "--runs_dir", str(tmp_path / "runs"),
                                    *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert snapshot(tmp_path) == before


def test_resume_refuses_changed_model_flags_and_keeps_the_run(tmp_path, speech_wav, capsys):
    run_dir = train(tmp_path, speech_wav)
    before = snapshot(run_dir)
    assert run_main(two_tier_main, ["--resume", run_dir, "--dim", "64"]) == 2
    assert "--dim cannot change" in capsys.readouterr().err
    assert snapshot(run_dir) == before


@both
def test_resume_refuses_the_other_models_run(tmp_path, speech_wav, capsys, model):
    run_dir = train(tmp_path, speech_wav, model=model)
    other = "baseline" if model == "twotier" else "twotier"
    before = snapshot(tmp_path)
    assert run_main(SCRIPTS[other], ["--resume", run_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a {model} run" in err[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags, message", [(["--input", "bytes"], "invalid choice"),
                                            (["--seq_len", "0"], "--seq_len must be at least 1")])
def test_baseline_bad_flags(tmp_path, speech_wav, capsys, flags, message):
    assert run_main(baseline_main, ["--data", speech_wav, "--runs_dir", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_best_checkpoint_epochs_and_patience(tmp_path, speech_wav, monkeypatch, capsys):
    """Valid NLL (scripted here) improves, then stops improving: best.pt holds the best interval's weights, the
    rows say which iteration is best and how many passes over the train split were made, --patience 2 stops the
    run two intervals after the best one with test NLL measured on the last and on the best weights, and the
    first interval warns that the budget would pass over the data far more than 20 times."""
    import lib.train
    real = lib.train.evaluate
    scripted = iter([3.0, 2.9, 2.95, 2.96, 2.97])

    def valid_as_scripted(model, levels, batch_size, device, max_clips=0, stop=None):
        return next(scripted) if max_clips else real(model, levels, batch_size, device, max_clips, stop)
    monkeypatch.setattr(lib.train, "evaluate", valid_as_scripted)
    run_dir = train(tmp_path, speech_wav, "--print_iters", "5", "--stop_iters", "100000", "--patience", "2")
    rows = Run(run_dir).metrics()
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20]
    assert [r["best_iteration"] for r in rows] == [5, 10, 10, 10]
    # the 1 s file is one clip of 8,000 samples = 250 chunks of 32; a batch of 8 walks 8 of them per step
    assert [r["epochs"] for r in rows] == [round(it * 8 / 250, 4) for it in (5, 10, 15, 20)]
    assert "test_bits" in rows[-1] and rows[-1]["best_test_bits"] != rows[-1]["test_bits"]
    best = torch.load(os.path.join(run_dir, "checkpoints", "best.pt"), weights_only=False)
    at_10 = torch.load(os.path.join(run_dir, "checkpoints", "it0000010.pt"), weights_only=False)
    assert best["state"]["iteration"] == 10 and all(torch.equal(best["model"][k], at_10["model"][k]) for k in best["model"])
    out = capsys.readouterr().out
    assert "stopped early: no improvement in 2 intervals (--patience 2)" in out
    assert re.search(r"warning: at this speed the run's budget passes over the train split about [\d,]+ times", out)
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_main(generate_main, [run_dir, "--best", "--n", "1", "--secs", "0.01", "--out", str(tmp_path / "g")]) == 0


def test_keep_checkpoints_prunes_old_ones_never_best_or_the_newest(tmp_path, speech_wav):
    run = train(tmp_path, speech_wav, "--print_iters", "5", "--stop_iters", "30", "--keep_checkpoints", "2",
                "--n_samples", "0")
    names = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert names == ["best.pt", "it0000025.pt", "it0000030.pt"]
    best = torch.load(os.path.join(run, "checkpoints", "best.pt"), weights_only=False)
    assert best["state"]["iteration"] == best["row"]["best_iteration"]
    assert run_main(SCRIPTS["twotier"], ["--resume", run, "--stop_iters", "40", "--keep_checkpoints", "1"]) == 0
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["best.pt", "it0000040.pt"]
