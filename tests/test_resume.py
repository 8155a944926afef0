"""Resume trusts nothing it can check: the data (by content, wherever it lies now), the run's own checkpoints, one
process per run; runs made before a flag existed still resume; failed audio writes are one line."""
import glob
import json
import os
import resource
import shutil
import subprocess
import sys

import torch

import generate
from conftest import REPO, run_main
from test_data import make_dataset
from test_faults import script, wait_for
from test_train import SCRIPTS, snapshot, train

SMALL = {"train": [1.0, 1.0], "valid": [1.0], "test": [1.0]}


def one_error(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


def test_resume_refuses_changed_data_and_says_what_changed(tmp_path, capsys):
    make_dataset(tmp_path / "ds", SMALL)
    run_dir = train(tmp_path, str(tmp_path / "ds"), "--n_samples", "0")
    make_dataset(tmp_path / "more", {"train": [1.0]})
    shutil.copy(tmp_path / "more" / "train" / "00000.wav", tmp_path / "ds" / "train" / "00002.wav")
    before = snapshot(run_dir)
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30"]) == 2
    err = one_error(capsys)
    assert "differs from what" in err and "train: 2 clips of 16,000 samples then, 3 clips of 24,000 now" in err
    assert snapshot(run_dir) == before
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30", "--accept_changed_data"]) == 0
    assert "training on changed data" in capsys.readouterr().err
    settings = json.load(open(os.path.join(run_dir, "settings.json")))
    assert settings["data_fingerprint"]["train"]["clips"] == 3 and len(settings["data_changes"]) == 1
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "40"]) == 0  # now the run's data
    os.remove(tmp_path / "ds" / "train" / "00002.wav")  # changed again: the earlier --accept_changed_data is not kept
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "50"]) == 2
    assert "differs from what" in one_error(capsys)


def test_a_moved_dataset_resumes_with_data_and_a_different_one_is_refused(tmp_path, capsys):
    make_dataset(tmp_path / "ds", SMALL)
    run_dir = train(tmp_path, str(tmp_path / "ds"), "--n_samples", "0")
    os.rename(tmp_path / "ds", tmp_path / "moved")
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30"]) == 2
    assert "is not there: if it moved, resume with --data" in one_error(capsys)
    make_dataset(tmp_path / "other", {"train": [1.0, 1.0], "valid": [0.5], "test": [1.0]})
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30", "--data",
                                         str(tmp_path / "other")]) == 2
    assert "valid: 1 clips of 8,000 samples then, 1 clips of 4,000 now" in one_error(capsys)
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30", "--data",
                                         str(tmp_path / "moved")]) == 0
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "it0000030.pt"), weights_only=False)
    assert ckpt["settings"]["data"] == str(tmp_path / "moved")


def test_a_run_made_before_a_flag_existed_resumes_with_its_default(tmp_path, speech_wav, capsys):
    """The runs kept under experiments/ that predate --precision (and --cuda_graph_step)."""
    old = json.load(open(os.path.join(REPO, "experiments", "baseline_cpu_time_reals_seqlen128_1795674863",
                                      "settings.json")))
    assert "precision" not in old["settings"] and "cuda_graph" not in old["settings"]
    run_dir = train(tmp_path, speech_wav, "--n_samples", "0", model="baseline")
    made = json.load(open(os.path.join(run_dir, "settings.json")))
    for key in ("precision", "cuda_graph_step", "accept_changed_data"):  # as a run made before them
        del made["settings"][key]
    with open(os.path.join(run_dir, "settings.json"), "w") as f:
        json.dump(made, f)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))  # its settings are then the run's settings.json (with no
    os.remove(os.path.join(run_dir, "metrics.jsonl"))  # history: else resume refuses to start over)
    assert run_main(SCRIPTS["baseline"], ["--resume", run_dir, "--stop_iters", "30"]) == 0, capsys.readouterr().err
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "it0000030.pt"), weights_only=False)
    assert ckpt["settings"]["precision"] == "tf32" and ckpt["settings"]["cuda_graph_step"] is False


def test_a_run_saved_under_old_flag_names_resumes(tmp_path, speech_wav, capsys):
    """--cuda_graph became --cuda_graph_step, and --test_on_best went: runs and checkpoints saved with them
    resume, and their checkpoints are not mistaken for another run's."""
    run_dir = train(tmp_path, speech_wav, "--n_samples", "0", "--stop_iters", "20")
    for path in [os.path.join(run_dir, "settings.json")]:
        made = json.load(open(path))
        made["settings"]["cuda_graph"] = made["settings"].pop("cuda_graph_step")
        made["settings"]["test_on_best"] = False
        json.dump(made, open(path, "w"))
    ckpt_path = os.path.join(run_dir, "checkpoints", "it0000020.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["settings"]["cuda_graph"] = ckpt["settings"].pop("cuda_graph_step")
    ckpt["settings"]["test_on_best"] = True
    torch.save(ckpt, ckpt_path)
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "30"]) == 0, capsys.readouterr().err
    assert "skipped" not in capsys.readouterr().err
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "it0000030.pt"), weights_only=False)
    assert ckpt["settings"]["cuda_graph_step"] is False and "cuda_graph" not in ckpt["settings"]
    assert "test_on_best" not in ckpt["settings"]


def test_a_second_process_on_a_training_run_is_refused_naming_the_first(tmp_path, speech_wav, capsys):
    runs = str(tmp_path / "runs")
    proc = script("twotier", "--preset", "tiny", "--data", speech_wav, "--stop_iters", "1000000", "--print_iters",
                  "10", "--n_samples", "0", "--runs_dir", runs)
    try:
        wait_for(lambda: glob.glob(f"{runs}/*/metrics.jsonl") or proc.poll() is not None)
        (run_dir,) = glob.glob(f"{runs}/*")
        # a small budget: were the second process let in, it would end at once (exit 0), not train for hours
        assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "20"]) == 2
        assert f"is being trained by process {proc.pid} now" in one_error(capsys)
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert run_main(SCRIPTS["twotier"], ["--resume", run_dir, "--stop_iters", "20"]) == 0  # the lock went with it


def test_a_checkpoint_of_another_model_in_a_run_is_skipped_never_resumed_into(tmp_path, speech_wav, capsys):
    two = train(tmp_path, speech_wav, "--n_samples", "0", runs="two")
    base = train(tmp_path, speech_wav, "--n_samples", "0", "--stop_iters", "10", runs="base", model="baseline")
    shutil.copy(os.path.join(base, "checkpoints", "it0000010.pt"), os.path.join(two, "checkpoints", "it0000099.pt"))
    own = contents(two, "it0000020.pt", "best.pt")
    capsys.readouterr()
    model, *_ = generate.load_run(two, torch.device("cpu"))
    assert type(model).__module__ == "two_tier"
    assert "it0000099.pt is not this run's (a baseline checkpoint in a twotier run); skipped" in \
        capsys.readouterr().err
    assert run_main(SCRIPTS["twotier"], ["--resume", two, "--stop_iters", "20"]) == 0  # nothing to do: at 20
    assert "from iteration 20 (it0000020.pt)" in capsys.readouterr().out
    assert contents(two, "it0000020.pt", "best.pt") == own
    rows = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [10, 20]


def contents(run_dir, *names):
    return [open(os.path.join(run_dir, "checkpoints", n), "rb").read() for n in names]


def limited(size):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_libsndfile_write_errors_are_one_line(tmp_path, speech_wav):
    """A full disk or a file-size limit makes libsndfile say 'System error.': generate.py and lib.prepare report
    it as a failed write (exit 1), not a traceback."""
    run_dir = train(tmp_path, speech_wav, "--n_samples", "0")
    # --backend torch: numba would write its compiled code's cache, which the limit stops first
    p = subprocess.run([sys.executable, "generate.py", run_dir, "--n", "1", "--secs", "2", "--out",
                        str(tmp_path / "gen"), "--backend", "torch"], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=limited(8000), timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().startswith("error: cannot write") and "libsndfile" in p.stderr
    assert os.listdir(tmp_path / "gen") == []  # no partial file
    src = tmp_path / "src"
    make_dataset(src, {"a": [2.0], "b": [2.0], "c": [2.0]})
    p = subprocess.run([sys.executable, "-m", "lib.prepare", str(src), str(tmp_path / "prepared"), "--clip_secs",
                        "2"], cwd=REPO, capture_output=True, text=True, preexec_fn=limited(4000), timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "error: cannot write" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "prepared") and not os.path.exists(tmp_path / "prepared.partial")

