"""Ctrl-C answers at once: the first signal's line is in the log within a second, whatever the step is doing."""
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from conftest import REPO
from lib.terminal import Interrupts
from test_faults import wait_for


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def test_the_watcher_answers_while_one_torch_op_holds_the_main_thread():
    """One matrix product of about 3 s on one thread: Python's own handler can run only after it. The first
    signal's line must come from the watcher thread, within half a second of the signal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = torch.randn(1024, 1024)
        b @ b  # warm: the first product pays for setting up
        # about 3 s of product, on a matrix made for it (a fixed 4096 takes only 1.2 s on an AVX-512 core), sized by
        # the fastest of five timings: one slowed by another process would make the product too short; at most
        # 8192 (256 MB a matrix)
        fastest = min(timed(lambda: b @ b) for _ in range(5))
        n = min(8192, int(1024 * (3.0 / fastest) ** (1 / 3)))
        a = torch.randn(n, n)
        said = []
        with Interrupts(say=lambda line: said.append(time.monotonic())):
            timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
            begun = time.monotonic()
            timer.start()
            a[:n, :n] @ a[:n, :n]
            ended = time.monotonic()
        timer.join()
    finally:
        torch.set_num_threads(threads)
    assert ended - begun > 1.5, f"the product took {ended - begun:.1f} s: too short to tell"
    assert said and said[0] - (begun + 0.5) < 0.5 and ended - said[0] > 0.5, (said, begun, ended)


def test_the_first_signal_is_in_the_log_at_once_during_a_long_step(tmp_path):
    """The default model on one thread, batch 64: a step of several seconds (about 7 s on a 2026 core; batch 16
    took 1.75 s on one, too short to tell the save from the signal), most of it inside single torch ops,
    where Python's handler cannot run. Output goes to a file (block-buffered, as under nohup or tee). The line
    must be there within a second of SIGINT; the save comes only after the step."""
    out = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "two_tier.py", "--frame_size", "2", "--batch_size", "64",
                                 "--threads", "1", "--n_samples", "0", "--print_iters", "1000", "--runs_dir",
                                 str(tmp_path / "runs")], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "chunks of 128 samples" in out.read_text() or proc.poll() is not None, timeout=120)
        time.sleep(1.0)  # inside the first step
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping after the current step" in out.read_text() or proc.poll() is not None, 30)
        said = time.monotonic() - sent
        wait_for(lambda: "interrupted at iteration" in out.read_text() or proc.poll() is not None, timeout=300)
        saved = time.monotonic() - sent
        assert proc.wait(timeout=120) == 130, out.read_text()[-2000:]
    finally:
        proc.kill()
    text = out.read_text()
    assert "stopping after the current step" in text and "interrupted at iteration 1;" in text, text[-2000:]
    assert saved > 2.0, f"the step ended {saved:.1f} s after the signal: too short to tell"
    assert said < 1.0, f"the line came {said:.1f} s after the signal (the save {saved:.1f} s after it)"
