"""A newcomer's first hour: what each command says and leaves behind (issue: every command in README answers
quickly and says what it is doing)."""
import glob
import os
import re
import signal

import torch

from lib.run import read_metrics
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
    assert read_metrics(run_dir) == []
