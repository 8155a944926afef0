"""The run folder decides what is the run's: --run_dir takes a new or empty folder or a run of the same command,
nothing else; the program writes over or deletes only files the run wrote, at the places it wrote them (a file it
skipped or does not know is set aside); checkpoints are ordered by their number."""
import builtins
import glob
import os
import shutil

import pytest
import torch

from conftest import run_main
import lib.run
from lib import checkpoint
from lib.report import report
from lib.run import Run
from test_train import train
from two_tier import main as two_tier_main

QUIET = ["--n_samples", "0"]


def tiny(data, *flags):
    return ["--preset", "tiny", "--data", data, "--print_iters", "2", *flags]


@pytest.mark.parametrize("case", ["other files", "a folder of runs", "inside a run", "a broken link", "empty"])
def test_run_dir_takes_no_folder_that_is_not_a_run_or_empty(tmp_path, speech_wav, capsys, case):
    made = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", *QUIET)  # runs/NAME
    target, message = {
        "other files": (tmp_path / "notes", "holds files that are no run's (layout.tmpl)"),
        "a folder of runs": (tmp_path / "runs", "is a folder of runs"),
        "inside a run": (os.path.join(made, "checkpoints", "new"), "is inside the run"),
        "a broken link": (tmp_path / "link", "is a broken link"),
        "empty": ("", "--run_dir is empty"),
    }[case]
    if case == "other files":
        os.makedirs(target)
        (target / "layout.tmpl").write_text("a note")
    if case == "a broken link":
        os.symlink(tmp_path / "nowhere", target)
    before = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
    capsys.readouterr()
    assert run_main(two_tier_main, tiny(speech_wav, "--stop_iters", "2", "--run_dir", str(target), *QUIET)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before  # nothing written, nothing removed


def test_a_resume_removes_only_the_temporary_files_it_wrote(tmp_path, speech_wav):
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", *QUIET)
    os.makedirs(os.path.join(run_dir, "notes"))
    kept = [os.path.join(run_dir, "notes", "layout.tmpl"), os.path.join(run_dir, "notes", "it0000100.tmp.pt"),
            os.path.join(run_dir, "layout.tmpl"), os.path.join(run_dir, "checkpoints", "readme.tmp.txt")]
    for path in kept:
        open(path, "w").write("not the run's")
    left = os.path.join(run_dir, "checkpoints", "it0000004.tmp.pt")  # what a kill mid-save leaves
    open(left, "wb").write(b"partial")
    assert run_main(two_tier_main, ["--resume", run_dir, "--stop_iters", "4"]) == 0
    assert all(os.path.exists(p) for p in kept) and not os.path.exists(left)


def test_a_checkpoint_resume_skipped_is_set_aside_and_the_samples_of_a_redone_interval_too(tmp_path, speech_wav):
    """it0000004.pt replaced by another run's: resume skips it, continues from it0000002.pt, and at iteration 4
    sets the other run's file aside instead of writing over it; the samples of iteration 4 the run had written are
    kept beside the rows set aside."""
    flags = ["--n_samples", "1", "--sample_secs", "0.05"]
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "4", "--print_iters", "2", *flags)
    other = train(tmp_path, speech_wav, "--stop_iters", "4", "--print_iters", "2", "--seed", "7", *flags, runs="other")
    mine = os.path.join(run_dir, "checkpoints", "it0000004.pt")
    shutil.copyfile(os.path.join(other, "checkpoints", "it0000004.pt"), mine)
    os.remove(os.path.join(run_dir, "checkpoints", "best.pt"))  # else resume continues from this copy of iteration 4
    old_sample = open(os.path.join(run_dir, "samples", "it0000004_0.wav"), "rb").read()
    assert run_main(two_tier_main, ["--resume", run_dir, "--stop_iters", "4"]) == 0
    (aside,) = glob.glob(os.path.join(run_dir, "checkpoints", "set_aside", "*it0000004.pt"))
    assert open(aside, "rb").read() == open(os.path.join(other, "checkpoints", "it0000004.pt"), "rb").read()
    assert checkpoint.own(Run(run_dir), mine)["state"]["iteration"] == 4  # the run's own again
    (sample,) = glob.glob(os.path.join(run_dir, "samples", "set_aside", "*it0000004_0.wav"))
    assert open(sample, "rb").read() == old_sample


def test_checkpoints_are_ordered_by_number_not_by_name(tmp_path, speech_wav):
    """From iteration 10,000,000 on the name it10000000.pt sorts before it9999000.pt as text."""
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", *QUIET)
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "it0000002.pt"), weights_only=False)
    for it in (9_999_000, 10_000_000):
        ckpt["state"]["iteration"] = it
        torch.save(ckpt, os.path.join(run_dir, "checkpoints", f"it{it:07d}.pt"))
    assert [os.path.basename(p) for p in checkpoint.paths(Run(run_dir))] == \
        ["it0000002.pt", "it9999000.pt", "it10000000.pt"]
    assert os.path.basename(checkpoint.newest(Run(run_dir), "resuming from")[0]) == "it10000000.pt"
    checkpoint.keep_newest(Run(run_dir), 1)
    assert [os.path.basename(p) for p in checkpoint.paths(Run(run_dir))] == ["it10000000.pt"]


def test_run_dir_continues_a_run_made_with_runs_dir_and_name(tmp_path, speech_wav):
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", "--name", "mine", *QUIET)
    assert run_main(two_tier_main, tiny(speech_wav, "--stop_iters", "4", "--run_dir", run_dir, *QUIET)) == 0
    assert Run(run_dir).metrics()[-1]["iteration"] == 4


def test_the_report_writes_no_file_into_a_run(tmp_path, speech_wav, capsys):
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", *QUIET)
    curves = os.path.join(run_dir, "curves.png")
    before = open(curves, "rb").read()
    from lib.report import main as report_main
    assert run_main(report_main, [run_dir, "--plot", curves]) == 2
    assert "is inside the run" in capsys.readouterr().err and open(curves, "rb").read() == before
    files = tmp_path / "compare_files"
    os.makedirs(files)
    (files / "reference.wav").write_bytes(b"mine")
    assert run_main(report_main, [run_dir, "--html", str(tmp_path / "compare.html")]) == 2
    assert "is not the files folder of a page this command wrote" in capsys.readouterr().err
    assert (files / "reference.wav").read_bytes() == b"mine"
    assert report([run_dir])  # reading it is fine


def test_settings_json_is_read_once_per_command(tmp_path, speech_wav, monkeypatch):
    """A resume that restores, repairs, records its segment, ends an interval (checkpoint ownership, the page, the
    report's last line) reads the run's settings.json once: the run's own write of it is kept, not read back."""
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", *QUIET)
    read, real_open = [], builtins.open

    def counting_open(path, mode="r", *args, **kwargs):
        if os.fspath(path).endswith("settings.json") and "r" in mode:
            read.append(path)
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", counting_open)
    lib.run._records.clear()  # as in a new process: nothing read yet
    assert run_main(two_tier_main, ["--resume", run_dir, "--stop_iters", "4"]) == 0
    assert Run(run_dir).metrics()[-1]["iteration"] == 4 and Run(run_dir).record()["segments"]
    assert len(read) == 1, read



def test_a_checkpoint_is_the_runs_own_only_with_the_runs_flags_where_ids_cannot_tell():
    """Runs made before run ids (run_id None on both sides): a checkpoint with another model flag is another run's;
    one whose flags differ only where a session may change them, or only by a flag the older record lacks (taken
    as the value the run used), is the run's own."""
    settings = {"dim": 64, "frame_size": 2, "mlp_first_relu": "on", "stop_iters": 10, "resume": None}
    record = {"model_id": "twotier", "run_id": None, "settings": settings}

    def ckpt(**changed):
        return {"model_id": "twotier", "run_id": None, "settings": {**settings, **changed}, "state": {"iteration": 10}}
    assert checkpoint.not_of_run(record, ckpt(dim=128), "it0000010.pt") == "--dim 128, the run has 64"
    assert checkpoint.not_of_run(record, ckpt(stop_iters=20, resume="RUN"), "it0000010.pt") == ""
    older = {**record, "settings": {k: v for k, v in settings.items() if k != "mlp_first_relu"}}
    assert checkpoint.not_of_run(older, ckpt(), "it0000010.pt") == ""
    assert checkpoint.not_of_run(older, ckpt(mlp_first_relu="off"), "it0000010.pt").startswith("--mlp_first_relu")
