"""A run's history is never replaced: resume continues from the run's own newest readable checkpoint (best.pt is
one) or refuses in one line; metrics rows it will redo, and lines that are no rows, are kept aside; pruning and
every reader of a checkpoint take only the run's own (its id, and the iteration its name says)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import generate
from conftest import REPO, run_main
from lib.run import SET_ASIDE, Run
from test_resume import limited, one_error
from test_train import SCRIPTS, snapshot, train

QUIET = ["--n_samples", "0"]


def rows_of(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def set_aside(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, SET_ASIDE))]


def test_a_finished_run_without_checkpoints_is_refused_never_started_over(tmp_path, speech_wav, capsys):
    """Runs kept under experiments/ hold settings and metrics only: resuming one must not start at iteration 0 in
    place (it replaced the rows of iterations 10-20)."""
    run_dir = train(tmp_path, speech_wav, *QUIET)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    before = snapshot(run_dir)
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "2", "--print_iters", "1"]) == 2
    err = one_error(capsys)
    assert f"{run_dir} cannot be resumed: it has metrics up to iteration 20 and no checkpoint" in err
    assert "to train these settings anew in a new run folder: python " in err
    assert snapshot(run_dir) == before


def test_a_run_whose_only_interval_checkpoint_is_damaged_resumes_from_best(tmp_path, speech_wav, capsys):
    """--keep_checkpoints 1 and a truncated checkpoint: best.pt is the run's own and readable, so the run continues
    from it, and best.pt is not overwritten by a restart at iteration 0."""
    run_dir = train(tmp_path, speech_wav, *QUIET, "--print_iters", "5", "--keep_checkpoints", "1")
    newest = os.path.join(run_dir, "checkpoints", "it0000020.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    rows = rows_of(run_dir)
    assert rows[-1]["best_iteration"] == 20
    capsys.readouterr()
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "22", "--print_iters", "1"]) == 0
    out = capsys.readouterr()
    assert "from iteration 20 (best.pt)" in out.out and "it0000020.pt is unreadable" in out.err
    assert [r["iteration"] for r in rows_of(run_dir)] == [5, 10, 15, 20, 21, 22]
    assert rows_of(run_dir)[:4] == rows


def test_resume_from_an_older_best_keeps_the_rows_it_will_redo_aside(tmp_path, speech_wav, capsys):
    run_dir = train(tmp_path, speech_wav, *QUIET, "--print_iters", "5")
    folder = os.path.join(run_dir, "checkpoints")
    shutil.copy(os.path.join(folder, "it0000010.pt"), os.path.join(folder, "best.pt"))  # the best was at 10
    for name in ("it0000005.pt", "it0000010.pt", "it0000015.pt"):
        os.remove(os.path.join(folder, name))
    with open(os.path.join(folder, "it0000020.pt"), "r+b") as f:
        f.truncate(100)
    rows = rows_of(run_dir)
    capsys.readouterr()
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "10"]) == 0
    assert "from iteration 10 (best.pt)" in capsys.readouterr().out
    assert rows_of(run_dir) == rows[:2]
    aside = set_aside(run_dir)
    assert [{k: v for k, v in r.items() if k != "set_aside"} for r in aside] == rows[2:]
    assert all("after best.pt (iteration 10), which the run resumed from" in r["set_aside"] for r in aside)


def test_keep_checkpoints_counts_only_the_runs_own(tmp_path, speech_wav):
    """A baseline's checkpoint copied in as it0000099.pt sorts after the run's own: it is neither counted nor
    removed, and the checkpoint just written stays."""
    run_dir = train(tmp_path, speech_wav, *QUIET, "--print_iters", "2", "--stop_iters", "4", runs="two")
    base = train(tmp_path, speech_wav, *QUIET, "--stop_iters", "10", runs="base", model="baseline")
    shutil.copy(os.path.join(base, "checkpoints", "it0000010.pt"), os.path.join(run_dir, "checkpoints",
                                                                               "it0000099.pt"))
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "8", "--keep_checkpoints", "1"]) == 0
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best.pt", "it0000008.pt", "it0000099.pt"]


@pytest.fixture
def two_runs_same_flags(tmp_path, speech_wav, half_second_wav):
    """Two runs with the same flags on other data: a checkpoint of one copied into the other must not pass."""
    mine = train(tmp_path, speech_wav, *QUIET, "--stop_iters", "10", runs="mine")
    other = train(tmp_path, half_second_wav, *QUIET, "--stop_iters", "30", runs="other")
    return mine, other


def test_generate_best_refuses_a_best_pt_of_another_run(tmp_path, two_runs_same_flags, capsys):
    mine, other = two_runs_same_flags
    shutil.copy(os.path.join(other, "checkpoints", "best.pt"), os.path.join(mine, "checkpoints", "best.pt"))
    capsys.readouterr()
    assert run_main(generate.main, [mine, "--best", "--n", "1", "--secs", "0.01", "--out", str(tmp_path / "g")]) == 2
    assert "best.pt is not this run's (saved by run" in one_error(capsys)
    assert not os.path.exists(tmp_path / "g")


def test_a_checkpoint_of_a_run_with_the_same_flags_is_never_taken_for_the_runs_own(tmp_path, two_runs_same_flags,
                                                                                   capsys):
    mine, other = two_runs_same_flags
    shutil.copy(os.path.join(other, "checkpoints", "it0000030.pt"), os.path.join(mine, "checkpoints",
                                                                                "it0000030.pt"))
    capsys.readouterr()
    *_, iteration, path = generate.load_run(mine, torch.device("cpu"))
    assert iteration == 10 and path.endswith("it0000010.pt")
    assert "it0000030.pt is not this run's (saved by run" in capsys.readouterr().err
    assert run_main(generate.main, [os.path.join(mine, "checkpoints", "it0000030.pt"), "--n", "1", "--secs",
                                    "0.01"]) == 2
    assert "is not this run's" in one_error(capsys)
    assert run_main(SCRIPTS["twotier"], ["--resume", mine, "--stop_iters", "10"]) == 0
    assert "from iteration 10 (it0000010.pt)" in capsys.readouterr().out
    assert [r["iteration"] for r in Run(mine).metrics()] == [10]


def test_a_checkpoint_whose_name_is_not_its_iteration_is_skipped(tmp_path, speech_wav, capsys):
    run_dir = train(tmp_path, speech_wav, *QUIET, "--stop_iters", "20")
    shutil.copy(os.path.join(run_dir, "checkpoints", "it0000010.pt"), os.path.join(run_dir, "checkpoints",
                                                                                  "it0000099.pt"))
    capsys.readouterr()
    *_, iteration, path = generate.load_run(run_dir, torch.device("cpu"))
    assert iteration == 20 and "it0000099.pt is not this run's (it holds iteration 10, not 99)" in \
        capsys.readouterr().err


def test_lines_that_are_no_metrics_rows_are_a_warning_and_kept_aside(tmp_path, speech_wav, capsys):
    """Valid JSON without an integer iteration raised KeyError / TypeError in the repair on resume."""
    run_dir = train(tmp_path, speech_wav, *QUIET, "--stop_iters", "20")
    rows = rows_of(run_dir)
    lines = ["{}", '{"iteration": "8"}', "[1, 2]", '{"iteration": true}']
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write("".join(line + "\n" for line in lines))
    capsys.readouterr()
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30"]) == 0
    err = capsys.readouterr().err
    assert all(f"line {n} is not a metrics row (no integer iteration)" in err for n in (3, 4, 5, 6))
    assert "Traceback" not in err
    assert [r["iteration"] for r in rows_of(run_dir)] == [r["iteration"] for r in rows] + [30]
    assert [a["line"] for a in set_aside(run_dir)] == lines


def test_a_checkpoint_write_that_fails_is_one_line(tmp_path, speech_wav):
    """torch.save reports a short write (a full disk, a file size limit) as a RuntimeError of its C++ writer."""
    runs = tmp_path / "runs"
    p = subprocess.run([sys.executable, "two_tier.py", "--preset", "tiny", "--data", speech_wav, "--runs_dir",
                        str(runs), *QUIET], cwd=REPO, capture_output=True, text=True, preexec_fn=limited(60_000),
                       timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and "it0000010.pt: the write stopped partway" in line
    assert "no checkpoint had been written" in line
    (run_dir,) = os.listdir(runs)
    assert os.listdir(runs / run_dir / "checkpoints") == []  # no partial file
