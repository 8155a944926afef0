"""A model file is all a new model takes: tests/toy_model.py, which nothing in lib/ names, trains, continues,
resumes exactly, reports and samples through the same loop, run folder, report and generate.py."""
import glob
import json
import os

import torch

from conftest import REPO, run_main
from generate import main as generate_main
from lib.report import report
from lib.run import Run
from test_train import final_params, losses


def test_a_model_defined_only_under_tests_trains_resumes_reports_and_samples(tmp_path, speech_wav):
    import toy_model
    argv = ["--data", speech_wav, "--batch_size", "4", "--print_iters", "2", "--n_samples", "1", "--sample_secs",
            "0.05"]
    run_dir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    assert run_main(toy_model.main, argv + ["--run_dir", run_dir, "--stop_iters", "2"]) == 0
    assert run_main(toy_model.main, argv + ["--run_dir", run_dir, "--stop_iters", "4"]) == 0  # the same command
    assert run_main(toy_model.main, ["--resume", run_dir, "--stop_iters", "6"]) == 0
    assert run_main(toy_model.main, argv + ["--run_dir", straight, "--stop_iters", "6"]) == 0
    assert [r["iteration"] for r in Run(run_dir).metrics()] == [2, 4, 6]
    assert losses(run_dir) == losses(straight)  # continued twice, exactly as the run never stopped
    (a, ia), (b, ib) = final_params(run_dir), final_params(straight)
    assert ia == ib == 6 and all(torch.equal(a[k], b[k]) for k in a)
    record = json.load(open(os.path.join(run_dir, "settings.json")))
    assert record["model_id"] == "toy" and record["module"] == "toy_model"
    assert "| toy |" in report([run_dir, straight])
    assert run_main(generate_main, [run_dir, "--n", "1", "--secs", "0.05", "--out", str(tmp_path / "gen")]) == 0
    assert glob.glob(str(tmp_path / "gen" / "*.wav")) and glob.glob(os.path.join(run_dir, "samples", "*.wav"))
    for path in glob.glob(os.path.join(REPO, "lib", "*.py")):  # nothing in lib/ knows it
        assert "toy" not in open(path).read().lower(), path
