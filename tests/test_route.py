"""The training's route held to a budget: a reader who follows `python two_tier.py` from the command line to the
first checkpoint written, or a resumed run to its first step, passes through fewer files, and switches between them
fewer times, than on 1a86490 (before the run folder became one object): measured by tests/route.py, with the
data's cache built (the first read of a dataset on a machine builds it: a longer route, once)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# on 1a86490, measured by tests/route.py with the commands below: (files, visits)
BEFORE = {"first checkpoint": (16, 497), "resumed to its first step": (17, 100)}
TINY = ["--preset", "tiny", "--stop_iters", "2", "--print_iters", "2"]


def route(until, *args):
    out = subprocess.run([sys.executable, os.path.join("tests", "route.py"), "--until", until, "two_tier.py", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    return len(found["files"]), found["visits"], found["files"]


@pytest.mark.parametrize("resume", ["--run_dir", "--resume"])
def test_the_route_to_the_first_checkpoint_and_to_a_resumed_step_is_shorter(tmp_path, resume):
    run_dir, new_dir = str(tmp_path / "run"), str(tmp_path / "new")
    subprocess.run([sys.executable, "two_tier.py", *TINY, "--run_dir", run_dir], cwd=REPO, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # also the data's cache, first
    files, visits, names = route("lib/checkpoint.py:save", *TINY, "--run_dir", new_dir)
    assert files < BEFORE["first checkpoint"][0] and visits < BEFORE["first checkpoint"][1], names
    assert "two_tier.py" in names and "lib/checkpoint.py" in names  # the measure followed the real route
    assert os.listdir(new_dir) == []  # stopped before its first checkpoint: a run that never trained leaves nothing
    more = ["--stop_iters", "4", "--preset", "tiny"] if resume == "--run_dir" else ["--stop_iters", "4"]
    files, visits, names = route("lib/step.py:train_step", resume, run_dir, *more)
    assert files < BEFORE["resumed to its first step"][0] and visits < BEFORE["resumed to its first step"][1], names
    assert "lib/checkpoint.py" in names and "lib/page.py" in names  # it restored and repaired
