"""A newcomer's first hour: what each command says and leaves behind (issue: every command in README answers
quickly and says what it is doing)."""
import glob
import os
import re
import signal

import numpy as np
import torch

from lib.run import Run
from test_faults import script, wait_for

QUIET = ["--n_samples", "0"]


def test_each_ctrl_c_keeps_one_mid_interval_checkpoint_not_every_one(tmp_path, speech_wav):
    """Two Ctrl-Cs in one interval, with a resume between: the first stop's checkpoint (it ends no interval) is
    removed once the second is saved; the interval checkpoints stay."""
    runs = str(tmp_path / "runs")
    proc = script("twotier", "--preset", "tiny", "--data", speech_wav, "--print_iters", "1000000", "--stop_iters",
                  "100000000", *QUIET, "--runs_dir", runs)
    stops = []
    for attempt in range(2):
        wait_for(lambda: "speed:" in open(glob.glob(f"{runs}/*/log.txt")[0]).read() if glob.glob(f"{runs}/*/log.txt")
                 else proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        (run_dir,) = glob.glob(f"{runs}/*")
        stops.append(int(re.search(r"interrupted at iteration (\d+)", out).group(1)))
        if attempt == 0:
            proc = script("twotier", "--resume", run_dir)
            wait_for(lambda: open(os.path.join(run_dir, "log.txt")).read().count("speed:") == 2 or
                     proc.poll() is not None)
    assert stops[1] > stops[0]
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == [f"it{stops[1]:07d}.pt"], names
    assert f"removed it{stops[0]:07d}.pt, the mid-interval checkpoint" in out
    assert out.rstrip().splitlines()[-1].startswith("interrupted at iteration")  # how to continue: the last line
    assert torch.load(os.path.join(run_dir, "checkpoints", names[0]), weights_only=False)["row"] is None
    assert Run(run_dir).metrics() == []


def test_run_names_say_what_differs_from_the_defaults():
    """The CPU example (282k parameters) and the default model (20.8M) were both twotier_fs2_nf64_<time>."""
    import two_tier
    from lib.settings import build_parser, parse_settings, run_tag

    def tag(*argv):
        parser = build_parser("two_tier.py", "", two_tier.add_model_args, two_tier.PRESETS)
        return run_tag(parser, two_tier.PRESETS, list(argv), parse_settings(parser, two_tier.PRESETS, list(argv), None))
    assert tag("--frame_size", "2", "--dim", "128", "--n_rnn", "1", "--batch_size", "16", "--stop_iters", "300",
               "--print_iters", "100") == "fs2_dim128_nrnn1_bs16"  # the budget and cadence do not name a model
    assert tag("--frame_size", "2") == "fs2" and tag() == "default"
    assert tag("--preset", "tiny", "--seed", "7") == "tiny_seed7"


def test_the_end_of_the_run_counts_the_interval_ends_still_to_come():
    """A run that ended 162 s after it started had been told 'about 80 s': training only. After the first interval
    end the run says when it ends with the ends still to come counted."""
    import argparse
    import lib.terminal
    lines = []
    args = argparse.Namespace(stop_iters=300, stop_time=12.0, print_iters=100, print_time=3600.0)
    state, interval = {"iteration": 0, "train_secs": 0.0}, {"secs": 0.0, "steps": 0, "bits": 0.0}
    progress = lib.terminal.Progress(args, state, lines.append, torch.device("cpu"), 1000, shown=False)
    for i in range(1, 101):
        state["iteration"], interval["steps"] = i, i
        state["train_secs"] += 0.3
        progress.step(state, interval, 0.3, synced=True)
    assert progress.say_end(state, 30.0)
    # 200 steps of 0.3 s = 60 s of training, and 2 more interval ends of 30 s: 120 s
    assert lines[-1].startswith("the interval's end took 30 s (valid NLL, checkpoint, samples, page); with 60 s of "
                                "training and 2 more interval end(s) left, the run ends in about 2 min"), lines[-1]


def test_the_compare_command_works_before_a_baseline_exists(tmp_path, capsys):
    """README's compare command names runs/baseline_*, which matches nothing until a baseline is trained."""
    from test_report import make_run
    from conftest import run_main
    from lib.report import main as report_main
    os.makedirs(tmp_path / "runs")
    make_run(tmp_path / "runs", "twotier_a_1")
    capsys.readouterr()
    assert run_main(report_main, [str(tmp_path / "runs" / "twotier_*"), str(tmp_path / "runs" / "baseline_*")]) in (0, None)
    captured = capsys.readouterr()
    assert "twotier_a_1" in captured.out and "baseline_* matches no run" in captured.err
    assert run_main(report_main, [str(tmp_path / "runs" / "baseline_*")]) == 2
    assert "no run matches" in capsys.readouterr().err


SAMPLE = """import argparse, sys, two_tier
from lib.kernels import twotier_step
from lib.sample import generate
p = argparse.ArgumentParser(); two_tier.add_model_args(p)
a = p.parse_args(["--frame_size", "2", "--dim", "32", "--n_rnn", "1", "--emb_size", "16"]); a.q_levels = 256
generate(two_tier.build_model(a).eval(), 1, 64, seed=0)
print(sum(twotier_step.stats.cache_misses.values()), sum(twotier_step.stats.cache_hits.values()))
"""


def test_two_processes_compile_the_sampler_once(tmp_path):
    """Two processes sampling at once on a machine whose numba cache is empty (a fresh install; the suite's own
    processes): one compiles, the other waits for it and loads what it wrote (numba issue 10128: without the lock
    both compiled, racing on numba's index)."""
    import subprocess
    import sys
    from conftest import REPO
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", SAMPLE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    counts = sorted(tuple(map(int, out.split())) for out, _ in outs)
    assert counts == [(0, 1), (1, 0)], counts  # (compiled, loaded): one each
    said = [err for _, err in outs if "compiling the fast sampler" in err]
    assert len(said) == 1  # the one that compiled says so; the other just waits


def test_a_fresh_install_writes_its_first_samples_without_a_compile(tmp_path, speech_wav):
    """numba's cache empty and no core to spare: the first interval's samples take the compiled step's numpy twin
    instead of waiting 15-30 s for its compile; nothing is compiled and nothing said about it."""
    import subprocess
    import sys
    from conftest import REPO
    cache, run_dir = tmp_path / "cache", str(tmp_path / "run")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "two_tier.py", "--preset", "tiny", "--data", speech_wav, "--stop_iters", "2",
                          "--print_iters", "2", "--n_samples", "2", "--threads", str(os.cpu_count() or 1),
                          "--run_dir", run_dir], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(glob.glob(os.path.join(Run(run_dir).samples, "it0000002_*.wav"))) == 2
    assert "compiling" not in out.stderr + out.stdout
    assert not glob.glob(str(cache / "**" / "kernels.*.nbi"), recursive=True)  # nothing compiled into the cache


def test_sound_stats_tell_speech_from_hiss_and_silence(tmp_path):
    """scripts/sound_stats.py, which notes/sampling.md's listening figures come from: real speech is mostly voiced
    near its speaker's pitch; white noise is flat and never voiced; silence is all pauses; a 200 Hz buzz is voiced
    at 200 Hz."""
    import soundfile as sf
    from conftest import RATE, speech
    from scripts.sound_stats import sound_stats
    noise = np.random.default_rng(0).normal(0, 0.1, RATE * 2).astype(np.float32)
    buzz = (0.3 * np.sign(np.sin(2 * np.pi * 200 * np.arange(RATE * 2) / RATE))).astype(np.float32)
    files = {}
    for name, audio in [("speech", speech(8.0)), ("noise", noise), ("silence", np.zeros(RATE, np.float32)),
                        ("buzz", buzz)]:
        files[name] = str(tmp_path / f"{name}.wav")
        sf.write(files[name], audio, RATE, subtype="PCM_16")
    talk, hiss, quiet, hum = (sound_stats([files[k]]) for k in ("speech", "noise", "silence", "buzz"))
    assert talk["voiced"] > 0.6 and talk["flatness"] < 0.05 and 120 < talk["pitch_hz"][1] < 300
    assert hiss["voiced"] < 0.05 and hiss["flatness"] > 0.4 and hiss["quiet"] == 0
    assert quiet["quiet"] == 1 and quiet["loud_frames"] == 0 and quiet["pitch_hz"] is None
    assert hum["voiced"] == 1 and hum["pitch_hz"][1] == 200
