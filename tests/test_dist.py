"""torchrun / DistributedDataParallel on the CPU (gloo): 2 processes of batch B train as 1 of batch 2B on the same
clips; resume is bit-exact for the same number of processes and refused for another; Ctrl-C saves and says how to
continue. Real torchrun subprocesses on the real speech data."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

SCRIPT_FILES = {"twotier": "two_tier.py", "baseline": "baseline.py", "threetier": "three_tier.py"}
TINY = {model: ["--preset", "tiny"] for model in SCRIPT_FILES}
LOGGED = ("iteration", "train_bits", "grad_norm", "valid_bits", "test_bits", "best_test_bits", "epochs")


@pytest.fixture(autouse=True, scope="module")
def short_data(speech_wav):
    """One second of real speech as every split: an interval's valid and test NLL take milliseconds, not the
    shipped 25 minutes' seconds (the processes' start-up is most of each test)."""
    for argv in TINY.values():
        if "--data" not in argv:
            argv += ["--data", speech_wav]


def command(model, nproc, argv):
    script = os.path.join(REPO, SCRIPT_FILES[model])
    if nproc == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *argv]


def train(model, nproc, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(command(model, nproc, argv + ["--device", "cpu", "--runs_dir", str(tmp_path)]), cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    return p


def failure(p):
    """What a failed torchrun printed: every line that names an error or a signal (a rank's own reason comes
    long before torchrun's summary), then the end."""
    lines = p.stderr.splitlines()
    why = [s for s in lines if any(w in s for w in ("rror", "terminate", "bort", "Signal", "Traceback"))]
    return "\n".join(why[:40] + ["..."] + lines[-30:])


def checkpoint(tmp_path, name, it):
    path, = glob.glob(str(tmp_path / f"*_{name}_*" / "checkpoints" / f"it{it:07d}.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("model", ["twotier", "baseline", "threetier"])
def test_two_ranks_of_batch_b_train_as_one_of_batch_2b(model, tmp_path):
    argv = TINY[model] + ["--stop_iters", "4", "--print_iters", "2", "--n_samples", "0"]
    p = train(model, 2, argv + ["--batch_size", "4", "--name", "two"], tmp_path)
    assert p.returncode == 0, failure(p)
    assert "2 processes (torchrun), global batch 8" in p.stdout
    p = train(model, 1, argv + ["--batch_size", "8", "--name", "one"], tmp_path)
    assert p.returncode == 0, failure(p)
    two, one = checkpoint(tmp_path, "two", 4), checkpoint(tmp_path, "one", 4)
    for k, v in one["model"].items():  # 4 steps: the reset step and 3 that carry h (h0 without a gradient)
        torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(two["h"], one["h"], rtol=1e-5, atol=1e-6)  # every rank's rows, in order
    for key in ("train_bits", "grad_norm", "valid_bits", "test_bits"):
        assert two["row"][key] == pytest.approx(one["row"][key], rel=1e-6), key
    assert two["row"]["epochs"] == one["row"]["epochs"]
    assert len(os.listdir(tmp_path)) == 2  # rank 1 made no run folder of its own


def test_resume_on_two_ranks_is_bit_exact_and_needs_two(tmp_path):
    argv = TINY["twotier"] + ["--batch_size", "4", "--print_iters", "2", "--n_samples", "1"]
    p = train("twotier", 2, argv + ["--stop_iters", "4", "--name", "straight"], tmp_path)
    assert p.returncode == 0, failure(p)
    p = train("twotier", 2, argv + ["--stop_iters", "2", "--name", "resumed"], tmp_path)
    assert p.returncode == 0, failure(p)
    run, = glob.glob(str(tmp_path / "*_resumed_*"))
    p = train("twotier", 1, ["--resume", run, "--stop_iters", "4"], tmp_path)
    assert p.returncode == 2 and "trained on 2 process(es), this is 1" in p.stderr
    p = train("twotier", 2, ["--resume", run, "--stop_iters", "4"], tmp_path)
    assert p.returncode == 0, failure(p)
    a, b = checkpoint(tmp_path, "straight", 4), checkpoint(tmp_path, "resumed", 4)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                 b["optimizer"]["state"][0].values()))
    assert torch.equal(a["h"], b["h"])
    assert a["row"]["train_bits"] == b["row"]["train_bits"]


def test_ctrl_c_under_torchrun_saves_every_rank_at_one_iteration(tmp_path):
    """Ctrl-C in a terminal signals torchrun and every process (SIGINT), then torchrun sends each a SIGTERM:
    the second signal must not abort the save."""
    argv = TINY["twotier"] + ["--batch_size", "4", "--stop_iters", "1000000", "--print_iters", "500000",
                              "--n_samples", "0", "--device", "cpu", "--runs_dir", str(tmp_path), "--name", "sig"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(command("twotier", 2, argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own process group
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(tmp_path / "*_sig_*" / "log.txt")):
        time.sleep(0.5)
    log = glob.glob(str(tmp_path / "*_sig_*" / "log.txt"))[0]
    while time.time() < deadline and "speed:" not in open(log).read():  # training steps are running
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C: the whole process group
    out, _ = p.communicate(timeout=120)
    saved = glob.glob(str(tmp_path / "*_sig_*" / "checkpoints" / "it*.pt"))
    assert len(saved) == 1, out[-3000:]
    # torchrun itself ends with its SignalException (one traceback, its own, exit 1); the ranks saved, and said so
    assert p.returncode == 1 and out.count("Traceback") == 1 and "SignalException" in out, out[-3000:]
    assert out.count("interrupted at iteration") == 1
    ckpt = torch.load(saved[0], map_location="cpu", weights_only=False)
    assert ckpt["h"].shape[1] == 8  # both ranks' rows
    saved_sums = ckpt["state"]["interval"]  # ... and both ranks' running sums of the interval, which resume restores
    assert len(saved_sums["ranks"]) == 2 and saved_sums["bits"] == sum(r[0] for r in saved_sums["ranks"]) / 2
    assert "continue with: torchrun --nproc_per_node 2 two_tier.py --resume" in open(log).read()
    # resume as the line says, to 4 steps past the interrupt: bit for bit a straight run of as many steps
    it = ckpt["state"]["iteration"]
    run_dir = os.path.dirname(os.path.dirname(saved[0]))
    p = train("twotier", 2, ["--resume", run_dir, "--stop_iters", str(it + 4)], tmp_path)
    assert p.returncode == 0, failure(p)
    straight = TINY["twotier"] + ["--batch_size", "4", "--stop_iters", str(it + 4), "--print_iters", "500000",
                                  "--n_samples", "0", "--name", "straight"]
    p = train("twotier", 2, straight, tmp_path)
    assert p.returncode == 0, failure(p)
    a, b = checkpoint(tmp_path, "straight", it + 4), checkpoint(tmp_path, "sig", it + 4)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and torch.equal(a["h"], b["h"])
    # the interval cut by the signal: its logged means too (each rank resumes its own running sums; from their
    # mean, the last digit of train_bits moved with the order of the additions)
    assert {k: a["row"][k] for k in LOGGED} == {k: b["row"][k] for k in LOGGED}


def rank_pids(launcher_pid):
    """{RANK: pid} of torchrun's worker processes (its children, by the RANK in their environment)."""
    pids = {}
    for child in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split():
        env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        rank = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0])] = int(child)
    return pids


def test_a_lost_rank_is_one_line_naming_it_and_how_to_resume(tmp_path):
    """SIGKILL one of two ranks mid-interval: the other stops within seconds, and says in one line that rank 1 was
    lost and how to continue, instead of gloo's traceback."""
    argv = TINY["twotier"] + ["--batch_size", "4", "--stop_iters", "1000000", "--print_iters", "20", "--n_samples",
                              "0", "--device", "cpu", "--runs_dir", str(tmp_path), "--name", "lost"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(command("twotier", 2, argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(tmp_path / "*_lost_*" / "checkpoints" / "it*.pt")):
        time.sleep(0.2)
    os.kill(rank_pids(p.pid)[1], signal.SIGKILL)
    killed = time.time()
    out, err = p.communicate(timeout=120)
    assert time.time() - killed < 60
    run_dir, = glob.glob(str(tmp_path / "*_lost_*"))
    mine = [line for line in err.splitlines() if line.startswith("error: ")]
    # one traceback, torchrun's own summary (ChildFailedError), as after Ctrl-C; none from rank 0
    assert len(mine) == 1 and err.count("Traceback") == 1 and "ChildFailedError" in err, err[-3000:]
    assert "interrupted while starting" not in err, err[-3000:]  # torchrun's SIGTERM to rank 0 after its line
    assert mine[0].startswith("error: rank 1 of this run's 2 processes was lost (Connection closed by peer"), mine
    assert f"continue with: torchrun --nproc_per_node 2 two_tier.py --resume {run_dir}" in mine[0]
