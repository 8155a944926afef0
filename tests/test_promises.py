"""README's promises that had no test: a real kill -9 at seeded random moments resumes bit for bit, time budgets
end to end, mu-law and a-law samples decoded end to end, generate.py's --animate and --reference, the 90/5/5
split, and the parameter counts README prints. notes/testing.md maps each promise to its guard."""
import glob
import os
import random
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from conftest import REPO, run_main
from generate import main as generate_main
from lib.quantize import dequantize
from lib.run import Run
from test_faults import script, wait_for
from test_train import SCRIPTS, final_params, losses, train


@pytest.mark.parametrize("model", ["twotier", "threetier"])
def test_a_real_kill_9_at_random_moments_resumes_bit_for_bit(tmp_path, speech_wav, model):
    """A training process killed with SIGKILL at seeded random moments (mid-step, mid-evaluation, mid-save,
    mid-samples: wherever the delay lands), then resumed, again and again: the end equals an uninterrupted run's,
    bit for bit. The seed is printed, so a failure reproduces."""
    budget = ["--print_iters", "20", "--stop_iters", "120"]
    straight = train(tmp_path, speech_wav, *budget, runs="straight", model=model)  # may compile the samplers
    started = time.monotonic()
    train(tmp_path, speech_wav, *budget, runs="timed", model=model)
    run_secs = time.monotonic() - started  # the whole run, compiled: 3 s on a fast core, more on a slow one
    runs = str(tmp_path / "killed")
    rng = random.Random(20261130)
    kills = 0
    started = time.monotonic()
    proc = script(model, "--preset", "tiny", "--data", speech_wav, *budget, "--runs_dir", runs)
    wait_for(lambda: glob.glob(f"{runs}/*/settings.json") or proc.poll() is not None)
    startup = time.monotonic() - started
    for attempt in range(6):
        try:  # past the start-up, in the loop or its saves; at most 0.4 of the run each time, so two kills or more
            proc.wait(timeout=(startup if attempt else 0) + rng.uniform(0.1, 0.4) * run_secs)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()
            break
        run_dir, = glob.glob(f"{runs}/*")
        proc = script(model, "--resume", run_dir)
    else:
        proc.wait(timeout=600)
    assert proc.returncode == 0 and kills >= 2, (kills, proc.returncode)
    run_dir, = glob.glob(f"{runs}/*")
    assert losses(straight) == losses(run_dir)
    (a, ia), (b, ib) = final_params(straight), final_params(run_dir)
    assert ia == ib == 120 and all(torch.equal(a[k], b[k]) for k in a)
    for f in sorted(os.listdir(os.path.join(straight, "samples"))):
        assert open(os.path.join(straight, "samples", f), "rb").read() == \
            open(os.path.join(run_dir, "samples", f), "rb").read(), f


def test_time_budgets_count_training_time_only_and_resume(tmp_path, speech_wav):
    """--stop_time and --print_time (the defaults' way of budgeting): evaluation, samples and checkpoints are not
    training time, so wall time runs ahead of it; a time-budgeted run stops at its budget and resumes to a larger
    one."""
    run = train(tmp_path, speech_wav, "--stop_iters", "0", "--print_iters", "0", "--stop_time", str(6 / 3600),
                "--print_time", "2",
                "--n_samples", "2", "--sample_secs", "0.5")
    rows = Run(run).metrics()
    assert len(rows) >= 2 and rows[-1]["train_secs"] >= 6.0
    assert rows[-1]["train_secs"] - 6.0 < rows[-1]["train_secs"] / rows[-1]["iteration"] * 3  # a step or so past
    assert all(r["wall_secs"] > r["train_secs"] for r in rows)
    for prev, r in zip(rows, rows[1:-1]):  # each interval holds about --print_time of training (the last: less)
        assert 2.0 <= r["train_secs"] - prev["train_secs"] < 2.0 + 3 * r["train_secs"] / r["iteration"]
    assert run_main(SCRIPTS["twotier"], ["--resume", run, "--stop_time", str(9 / 3600)]) == 0
    more = Run(run).metrics()
    assert more[:len(rows)] == rows and more[-1]["train_secs"] >= 9.0


@pytest.mark.parametrize("qtype", ["mulaw", "alaw"])
def test_generated_samples_are_decoded_with_the_runs_quantization(tmp_path, speech_wav, qtype):
    run = train(tmp_path, speech_wav, "--qtype", qtype, "--n_samples", "1", "--sample_secs", "0.25")
    from lib.audio import write_wav
    write_wav(str(tmp_path / "codebook.wav"), dequantize(torch.arange(256), 256, qtype).numpy(), 8000)
    codebook16 = sf.read(tmp_path / "codebook.wav", dtype="int16")[0]  # each level as a 16-bit WAV holds it
    for path in glob.glob(os.path.join(run, "samples", "*.wav")) + [generated(tmp_path, run)]:
        audio, _ = sf.read(path, dtype="int16")
        assert np.isin(audio, codebook16).all(), path  # every sample is a level of the run's code
        assert len(np.unique(audio)) > 3


def generated(tmp_path, run):
    assert run_main(generate_main, [run, "--n", "1", "--secs", "0.25", "--out", str(tmp_path / "gen")]) == 0
    return str(tmp_path / "gen" / "seed0_temp1_000.wav")


def test_generate_reference_and_animate(tmp_path, speech_wav):
    run = train(tmp_path, speech_wav, "--n_samples", "0")
    assert run_main(generate_main, [run, "--n", "2", "--secs", "0.02", "--reference", "--out", str(tmp_path / "r"),
                                    "--plot_softmax", "--animate", "--plot_secs", "0.005"]) == 0
    for k in range(2):
        audio, rate = sf.read(tmp_path / "r" / f"seed0_temp1_{k:03d}.wav")
        assert len(audio) == 160 and rate == 8000
    gif = Image.open(tmp_path / "r" / "seed0_temp1_softmax.gif")
    assert gif.n_frames == 40  # one frame per step shown (0.005 s at 8 kHz)
    assert Image.open(tmp_path / "r" / "seed0_temp1_softmax.png").size[0] > 0


def test_the_split_is_90_5_5_by_file(tmp_path):
    from lib.prepare import split_files
    files = [f"{i:03d}.wav" for i in range(100)]
    split = split_files(files, (0.9, 0.05, 0.05), seed=0)
    assert [len(split[k]) for k in ("train", "valid", "test")] == [90, 5, 5]
    assert sorted(sum(split.values(), [])) == files  # each file in exactly one split
    assert split == split_files(list(reversed(files)), (0.9, 0.05, 0.05), seed=0)  # of the sorted list
    assert split != split_files(files, (0.9, 0.05, 0.05), seed=1)


def test_readme_parameter_counts_are_what_the_scripts_print(capsys):
    readme = open(os.path.join(REPO, "README.md")).read()
    claims = re.findall(r"python (\S+\.py)([^\n|]*?) --dry_run \| tail -1 +# (\w+): ([\d,]+) parameters", readme)
    millions = re.search(r"two-tier model \(([\d.]+)M parameters\)", readme).group(1)
    claims.append(("two_tier.py", " --frame_size 2", "twotier", f"{float(millions):.1f}M"))
    assert len(claims) == 3
    for script_name, flags, model, count in claims:
        capsys.readouterr()
        assert run_main(SCRIPTS[model], [*flags.split(), "--dry_run"]) == 0
        printed = int(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1].split()[0].replace(",", ""))
        if count.endswith("M"):
            assert f"{printed / 1e6:.1f}M" == count
        else:
            assert printed == int(count.replace(",", "")), (script_name, flags)
