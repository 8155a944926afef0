"""The fourth trust pass: a run always finishes (its best.pt rebuilt from its own checkpoints), a closed terminal
(SIGHUP) is a stop that saves, ordinary bad input is one line, and a run that cannot start leaves no folder."""
import glob
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from conftest import REPO, run_main
from lib.run import Run
from test_faults import wait_for
from test_train import train
from two_tier import main as two_tier_main

QUIET = ["--n_samples", "0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, speech_wav):
    """A run whose best valid NLL is not at its last interval (lr 0.05), 30 iterations, intervals of 2."""
    tmp = tmp_path_factory.mktemp("finished")
    run_dir = train(tmp, speech_wav, "--lr", "0.05", "--stop_iters", "30", "--print_iters", "2", *QUIET)
    best = Run(run_dir).metrics()[-1]["best_iteration"]
    assert best < 30, "the reproduction needs a run whose best interval is not its last"
    return run_dir, best


@pytest.mark.parametrize("damage", ["removed", "truncated", "another run's"])
def test_a_run_whose_best_pt_is_gone_still_finishes(tmp_path, finished, damage, capsys):
    """The reproduction: the last checkpoint removed and best.pt removed, truncated or replaced by another run's:
    every resume used to stop at the end with 'best.pt is unreadable', writing nothing. Now best.pt is rebuilt
    from the run's own checkpoint of its best iteration, and the run ends with its test NLL there."""
    source, best = finished
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    os.remove(os.path.join(run_dir, "checkpoints", "it0000030.pt"))
    best_pt = os.path.join(run_dir, "checkpoints", "best.pt")
    if damage == "removed":
        os.remove(best_pt)
    elif damage == "truncated":
        os.truncate(best_pt, 100)
    else:
        data = json.load(open(os.path.join(source, "settings.json")))["settings"]["data"]
        other = train(tmp_path, data, "--stop_iters", "2", "--print_iters", "2", *QUIET, runs="other")
        shutil.copyfile(os.path.join(other, "checkpoints", "best.pt"), best_pt)
    capsys.readouterr()
    assert run_main(two_tier_main, ["--resume", run_dir]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt from it{best:07d}.pt" in out
    last = Run(run_dir).metrics()[-1]
    assert last["iteration"] == 30 and last["best_iteration"] == best and last["best_test_bits"] is not None
    assert last["best_test_bits"] == Run(source).metrics()[-1]["best_test_bits"]  # the same weights, the same NLL
    if damage != "removed":  # what was there is kept, not replaced
        assert len(glob.glob(os.path.join(run_dir, "checkpoints", "set_aside", "*best.pt"))) == 1


def test_with_no_best_weights_left_the_run_says_so_and_finishes(tmp_path, finished, capsys):
    source, best = finished
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    for name in ("it0000030.pt", "best.pt", f"it{best:07d}.pt"):
        os.remove(os.path.join(run_dir, "checkpoints", name))
    capsys.readouterr()
    assert run_main(two_tier_main, ["--resume", run_dir]) == 0
    out = capsys.readouterr().out
    assert "no test NLL on it" in out and "the test NLL is measured on the last weights only" in out
    assert Run(run_dir).metrics()[-1]["best_test_bits"] is None


def test_sighup_from_a_closed_terminal_saves_and_says_how_to_continue(tmp_path, speech_wav):
    """An ssh session closed without nohup: the terminal is gone (writes fail) and SIGHUP comes. The run saves after
    the current step, exits 129, and its log says how to continue."""
    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = str(tmp_path / "runs")
    proc = subprocess.Popen([sys.executable, "two_tier.py", "--preset", "tiny", "--data", speech_wav, "--print_iters",
                             "25", "--stop_iters", "100000", *QUIET, "--runs_dir", runs], cwd=REPO, env=env,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    drained = threading.Thread(target=lambda: drain(master), daemon=True)
    drained.start()
    try:
        wait_for(lambda: any(Run(d).metrics() for d in glob.glob(f"{runs}/*")) or proc.poll() is not None)
        os.close(master)  # the terminal is gone: the run's writes to it fail from now on
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    finally:
        proc.kill()
    (run_dir,) = glob.glob(f"{runs}/*")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "continue with: python two_tier.py --resume" in log, log[-1500:]
    it = int(log.split("interrupted at iteration ")[1].split(";")[0])
    assert os.path.exists(os.path.join(run_dir, "checkpoints", f"it{it:07d}.pt"))


def drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1180591620717411303424"], "--seed must be >= 0"),
    (["--batch_size", "10000000000", "--stop_iters", "2"], "error: out of memory"),
])
def test_ordinary_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, speech_wav, capsys, flags, message):
    runs = tmp_path / "runs"
    code = run_main(two_tier_main, ["--preset", "tiny", "--data", speech_wav, *QUIET, "--runs_dir", str(runs), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(runs) or os.listdir(runs) == []


def test_a_model_too_big_for_memory_is_one_line(capsys):
    assert run_main(two_tier_main, ["--preset", "tiny", "--dim", "100000000", "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "--dim" in err and len(err.strip().splitlines()) == 1


def test_tensorboard_missing_is_one_line_before_any_folder(tmp_path, speech_wav):
    """As where tensorboard is not installed: importing it fails. The run says so before it makes its folder,
    and a run made with the flag resumes with --no_tensorboard."""
    code = ("import sys\nsys.modules['tensorboard'] = sys.modules['torch.utils.tensorboard'] = None\n"
            "import two_tier\ntwo_tier.main(sys.argv[1:])\n")
    runs = tmp_path / "runs"
    argv = ["--preset", "tiny", "--data", speech_wav, *QUIET, "--stop_iters", "2", "--print_iters", "2"]
    p = subprocess.run([sys.executable, "-c", code, *argv, "--tensorboard", "--runs_dir", str(runs)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--no_tensorboard" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(runs) or os.listdir(runs) == []
    run_dir = str(tmp_path / "made_with_it")
    assert run_main(two_tier_main, argv + ["--tensorboard", "--run_dir", run_dir]) == 0
    p = subprocess.run([sys.executable, "-c", code, "--resume", run_dir, "--stop_iters", "4"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--no_tensorboard" in p.stderr
    p = subprocess.run([sys.executable, "-c", code, "--resume", run_dir, "--stop_iters", "4", "--no_tensorboard"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert Run(run_dir).metrics()[-1]["iteration"] == 4


@pytest.fixture
def read_only(tmp_path, finished):
    """The finished run seen through a read-only bind mount (as on a shared, read-only file system)."""
    copy, mount = tmp_path / "run", tmp_path / "ro"
    shutil.copytree(finished[0], copy)
    os.makedirs(mount)
    if subprocess.run(["mount", "--bind", str(copy), str(mount)], capture_output=True).returncode or \
            subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", str(mount)], capture_output=True)
        pytest.skip("no bind mounts here (needs root): a read-only run folder cannot be made")
    yield str(mount)
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_run_on_a_read_only_mount_is_read_reported_and_sampled_and_resuming_it_is_one_line(read_only, tmp_path,
                                                                                               capsys):
    from generate import main as generate_main
    from lib.report import report
    assert run_main(two_tier_main, ["--resume", read_only]) == 2
    err = capsys.readouterr().err
    assert "cannot be written here (Read-only file system)" in err and "Traceback" not in err
    assert json.loads(report([read_only], as_json=True))["iterations"] == 30
    assert run_main(generate_main, [read_only, "--n", "1", "--secs", "0.05"]) == 2
    assert "give --out" in capsys.readouterr().err
    assert run_main(generate_main, [read_only, "--n", "1", "--secs", "0.05", "--out", str(tmp_path / "out")]) == 0
    assert glob.glob(str(tmp_path / "out" / "*.wav"))


def test_clipped_or_cancelled_audio_is_said_in_one_line(tmp_path, finished, capsys):
    """Real speech, made loud as a float WAV (peaks of 2.6), as --data, given to lib.prepare and as a --prime; and
    the same speech as an antiphase stereo prime (left = -right), which averages to silence."""
    import numpy as np
    import soundfile as sf
    from conftest import RATE, speech
    from generate import main as generate_main
    from lib.prepare import main as prepare_main
    voice = speech(2.0)
    loud = voice * (2.6 / np.abs(voice).max())
    src = tmp_path / "src"
    os.makedirs(src)
    sf.write(src / "loud.wav", loud, RATE, subtype="FLOAT")
    for k in (1, 2):  # a split needs three files
        sf.write(src / f"speech{k}.wav", speech(2.0, clip=k), RATE, subtype="PCM_16")
    sf.write(tmp_path / "antiphase.wav", np.stack([voice, -voice], 1), RATE, subtype="PCM_16")
    share = float(np.mean(np.abs(loud) > 1))
    capsys.readouterr()
    assert run_main(prepare_main, [str(src), str(tmp_path / "prepared"), "--clip_secs", "0.5"]) == 0
    err = capsys.readouterr().err
    assert f"{share:.2%} of its samples lie beyond +-1 (peak 2.60) and are clipped" in err, err
    out = ["--n", "1", "--secs", "0.05", "--out", str(tmp_path / "out")]
    assert run_main(generate_main, [finished[0], "--prime", str(src / "loud.wav"), *out]) == 0
    assert "are clipped to +-1" in capsys.readouterr().err
    assert run_main(generate_main, [finished[0], "--prime", str(tmp_path / "antiphase.wav"), *out]) == 0
    err = capsys.readouterr().err
    assert "channels cancel when averaged to mono" in err and len(err.strip().splitlines()) == 1
    from lib.audio import read_mono
    decoded = voice / np.abs(voice).max()  # a lossy decoder's overshoot of a normalized file: a few samples, 1%
    decoded[np.argsort(np.abs(decoded))[-3:]] *= 1.01
    sf.write(tmp_path / "overshoot.wav", decoded, RATE, subtype="FLOAT")
    read_mono(str(tmp_path / "overshoot.wav"))
    assert capsys.readouterr().err == ""
