"""Beyond one machine, with real torchrun processes on 127.0.0.1 (gloo, CPU): two "nodes" (two torchrun agents that
meet at a c10d rendezvous) train as one node of two processes and as one process of the doubled batch; a worker
killed under --max_restarts is restarted and continues the run; the same command run again (a requeued job)
continues its --run_dir; and what cannot work ends in one line, in bounded time."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from test_dist import LOGGED, failure, rank_pids

TINY = ["--preset", "tiny", "--batch_size", "4", "--n_samples", "0", "--device", "cpu"]
ARGV = TINY + ["--stop_iters", "20", "--print_iters", "10"]  # with --data: one second of speech as every split
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*flags, repo=REPO):
    return [sys.executable, "-m", "torch.distributed.run", *flags, os.path.join(repo, "two_tier.py")]


def node(port, argv, extra=(), repo=REPO):
    """One "node": a torchrun agent with one process, meeting the other at 127.0.0.1:port."""
    return subprocess.Popen(torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                     f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", *extra, repo=repo) + argv,
                            cwd=repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final(run_dir, it):
    return torch.load(os.path.join(run_dir, "checkpoints", f"it{it:07d}.pt"), map_location="cpu", weights_only=False)


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k in LOGGED} for line in f]


def same_run(a, b, it):
    """Two run folders that computed the same: the final checkpoint's tensors and every logged number."""
    x, y = final(a, it), final(b, it)
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]) and torch.equal(x["h"], y["h"])
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, speech_wav):
    """The reference: one node, two processes of batch 4, 20 iterations, intervals of 10."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    p = subprocess.run(torchrun("--standalone", "--nproc_per_node=2") + ARGV + ["--data", speech_wav, "--run_dir",
                                                                                 str(run_dir)], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, failure(p)
    return run_dir


def test_two_nodes_train_as_one_node_of_two_and_one_process_of_the_doubled_batch(tmp_path, one_node, speech_wav):
    """Two torchrun agents (two "nodes" of one process each) meet at a c10d rendezvous: one run folder, written by
    global rank 0 (node 1's process has LOCAL_RANK 0 too), the same run as one node's two processes, bit for bit,
    and as one process of batch 8, to float tolerance (the gradients are averaged in another order)."""
    port = free_port()
    nodes = [node(port, ARGV + ["--data", speech_wav, "--run_dir", str(tmp_path / "nodes"), "--tensorboard"])
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    assert os.listdir(tmp_path) == ["nodes"]  # one run folder
    assert "2 processes (torchrun), global batch 8" in open(tmp_path / "nodes" / "log.txt").read()
    assert len(os.listdir(tmp_path / "nodes" / "tensorboard")) == 1  # one event file: rank 0 alone writes it
    same_run(tmp_path / "nodes", one_node, 20)
    one = subprocess.run([sys.executable, "two_tier.py", *ARGV, "--data", speech_wav, "--batch_size", "8", "--run_dir",
                          str(tmp_path / "one")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    a, b = final(tmp_path / "nodes", 20), final(tmp_path / "one", 20)
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(a["h"], b["h"], rtol=1e-5, atol=1e-6)


def test_a_killed_worker_is_restarted_and_continues_the_run_as_if_never_stopped(tmp_path, one_node, speech_wav):
    """torchrun --max_restarts 1: SIGKILL rank 1 after the first checkpoint; torchrun restarts both workers, which
    continue the run from its newest checkpoint, without anyone adding --resume, and end where an uninterrupted
    run ends, with one metrics row per interval."""
    run_dir = tmp_path / "restarted"
    p = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "--max_restarts=1") + ARGV +
                         ["--data", speech_wav, "--run_dir", str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(run_dir / "checkpoints" / "it0000010.pt"):
        time.sleep(0.02)
    os.kill(rank_pids(p.pid)[1], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    log = open(run_dir / "log.txt").read()
    assert "restarted by torchrun (restart 1, --max_restarts)" in log, log[-2000:]
    same_run(one_node, run_dir, 20)
    assert [r["iteration"] for r in rows(run_dir)] == [10, 20]


def test_the_same_command_again_continues_its_run(tmp_path, speech_wav):
    """A requeued job runs the very same command: the first time it creates --run_dir, every later time it continues
    it (here after a SIGTERM, then after a SIGKILL), and ends where an uninterrupted run ends; a command whose
    model flags differ from the run's is refused in one line."""
    command = [sys.executable, "two_tier.py", *TINY, "--data", speech_wav, "--stop_iters", "30", "--print_iters",
               "10", "--run_dir"]
    straight = subprocess.run(command + [str(tmp_path / "straight")], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "requeued"
    for stop, after in ((signal.SIGTERM, 10), (signal.SIGKILL, 20)):
        p = subprocess.Popen(command + [str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(run_dir / "checkpoints" / f"it{after:07d}.pt"):
            time.sleep(0.02)
        p.send_signal(stop)
        assert p.wait(timeout=120) == (143 if stop == signal.SIGTERM else -9)
    again = subprocess.run(command + [str(run_dir)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    same_run(tmp_path / "straight", run_dir, 30)
    other = subprocess.run(command + [str(run_dir), "--dim", "48"], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert other.stderr.startswith(f"error: --dim 48 differs from the run in {run_dir}"), other.stderr


def one_line_each(nodes, started):
    """Every node ended within bounded time, with one line of its own (then torchrun's summary) -> the lines."""
    errs = [p.communicate(timeout=120)[1] for p in nodes]
    assert time.time() - started < 90
    lines = []
    for p, err in zip(nodes, errs):
        mine = [line for line in err.splitlines() if line.startswith("error: ")]
        assert p.returncode != 0 and len(mine) == 1, err[-3000:]
        lines += mine
    return lines


def test_a_node_with_other_data_is_one_line_on_every_node(tmp_path, speech_wav, half_second_wav):
    port, started = free_port(), time.time()
    nodes = [node(port, TINY + ["--stop_iters", "4", "--data", data, "--run_dir", str(tmp_path / "run")])
             for data in (speech_wav, half_second_wav)]
    for line in one_line_each(nodes, started):
        assert line.startswith("error: rank 1 has other data (fingerprint "), line
    assert not os.path.exists(tmp_path / "run")  # nothing written: the check comes before the run folder


def test_a_node_with_other_code_is_one_line_on_every_node(tmp_path, speech_wav):
    """The second node runs a copy of the code that is no git checkout, with one uncommitted edit: told by content."""
    copy = tmp_path / "copy"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "experiments", "notes",
                                                              "__pycache__"))
    with open(copy / "lib" / "step.py", "a") as f:
        f.write("# an edit on one node only\n")
    port, started = free_port(), time.time()
    argv = TINY + ["--stop_iters", "4", "--data", speech_wav, "--run_dir", str(tmp_path / "run")]
    nodes = [node(port, argv), node(port, argv, repo=str(copy))]
    for line in one_line_each(nodes, started):
        assert line.startswith("error: rank 1 has other code (digest "), line


def test_a_node_started_with_other_flags_is_one_line_on_every_node(tmp_path, speech_wav):
    """The same code and data, but one node was given another --lr: it would train a quietly different replica."""
    port, started = free_port(), time.time()
    argv = TINY + ["--stop_iters", "4", "--data", speech_wav, "--run_dir", str(tmp_path / "run")]
    nodes = [node(port, argv), node(port, argv + ["--lr", "0.002"])]
    for line in one_line_each(nodes, started):
        assert line.startswith("error: rank 1 has other --lr (0.002) than rank 0 (0.001)"), line
    assert not os.path.exists(tmp_path / "run")


def test_a_node_that_never_comes_is_one_line_in_bounded_time(tmp_path):
    """One node of two started: torchrun's rendezvous gives up after --rdzv_conf join_timeout, and says so."""
    started = time.time()
    p = node(free_port(), TINY + ["--stop_iters", "4", "--run_dir", str(tmp_path / "run")],
             extra=["--rdzv_conf=join_timeout=5"])
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and time.time() - started < 60
    assert "RendezvousTimeoutError" in err, err[-3000:]
    assert not os.path.exists(tmp_path / "run")


def test_a_restarted_worker_without_run_dir_refuses_to_start_a_new_run(tmp_path):
    env = dict(ENV, TORCHELASTIC_RESTART_COUNT="1")
    p = subprocess.run([sys.executable, "two_tier.py", *TINY, "--stop_iters", "4", "--runs_dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: torchrun restarted this process"), p.stderr
    assert os.listdir(tmp_path) == []
