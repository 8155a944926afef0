"""python -m lib.report: window arithmetic, the columns of settings that differ, bad input, plots and JSON."""
import json
import os

import pytest

from conftest import run_main
from lib.report import main as report_main, report
from lib.windows import TIME_UNITS, parse_windows, window_mean
from test_train import SCRIPTS, train

ROWS = [{"iteration": 100, "train_secs": 60.0, "train_bits": 3.0, "valid_bits": 2.9},
        {"iteration": 200, "train_secs": 120.0, "train_bits": 2.0, "valid_bits": 2.1},
        {"iteration": 300, "train_secs": 180.0, "train_bits": 1.0, "valid_bits": 2.2, "test_bits": 2.25,
         "best_iteration": 200, "best_test_bits": 2.05}]


def make_run(folder, name, rows=ROWS, model="twotier", **settings):
    run = folder / name
    os.makedirs(run)
    base = {"dim": 64, "frame_size": 2, "seed": 1, "name": name, "runs_dir": "runs"}
    json.dump({"model_id": model, "settings": {**base, **settings}, "parameters": 1234}, open(run / "settings.json", "w"))
    with open(run / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(run)


def test_window_means_weigh_each_interval_by_its_steps_inside():
    assert window_mean(ROWS, "train_secs", 0, 120) == pytest.approx(2.5)
    assert window_mean(ROWS, "train_secs", 90, 150) == pytest.approx(1.5)  # half of two intervals each
    assert window_mean(ROWS, "iteration", 0, 150) == pytest.approx((100 * 3 + 50 * 2) / 150)
    assert window_mean(ROWS, "train_secs", 150, 210) is None  # not reached: the run ends at 180 s
    assert window_mean(ROWS, "iteration", 0, 300) == pytest.approx(2.0)
    assert parse_windows("0-5m,25-30m", TIME_UNITS) == [("0-5m", 0, 300), ("25-30m", 1500, 1800)]


def test_table_shows_settings_that_differ_dashes_and_test_at_best(tmp_path):
    a = make_run(tmp_path, "twotier_a_1", dim=64)
    b = make_run(tmp_path, "twotier_b_2", dim=128, rows=ROWS[:2])
    table = report([a, b], time_windows="0-2m,2-3m", iter_windows="0-100,200-300").splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:3] == ["run", "model", "--dim"] and "--seed" not in head and "--name" not in head
    first = [c.strip() for c in table[2].strip("|").split("|")]
    second = [c.strip() for c in table[3].strip("|").split("|")]
    assert first[3:6] == ["1,234", "300", "0.050"]
    assert first[6:8] == ["2.500", "1.000"] and second[6:8] == ["2.500", "\u2014"]  # b never reached 3 min
    assert first[8:10] == ["3.000", "1.000"] and second[9] == "\u2014"
    assert first[10:] == ["2.100", "200 (0.033)", "2.050"]  # test NLL measured on best.pt at the end
    assert second[-1] == "\u2014"  # no test NLL was measured at b's best checkpoint


def test_a_parent_folder_json_and_plot(tmp_path, capsys):
    make_run(tmp_path / "runs", "twotier_a_1")
    make_run(tmp_path / "runs", "baseline_b_2", model="baseline", dim=32)
    assert run_main(report_main, [str(tmp_path / "runs"), "--json", "--plot", str(tmp_path / "c.png")]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["run"] for r in runs] == ["baseline_b_2", "twotier_a_1"] and runs[0]["best_valid"] == 2.1
    assert os.path.getsize(tmp_path / "c.png") > 5000


def test_bad_input_is_one_line_or_a_warning(tmp_path, capsys):
    assert run_main(report_main, [str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a run folder" in err[0]
    empty = make_run(tmp_path, "twotier_empty_1", rows=[])
    assert run_main(report_main, [empty]) == 2
    assert "has no metrics rows yet" in capsys.readouterr().err
    cut = make_run(tmp_path, "twotier_cut_2")
    with open(os.path.join(cut, "metrics.jsonl"), "a") as f:
        f.write('{"iteration": 400, "train_se')
    assert run_main(report_main, [cut, empty]) == 0
    out, err = capsys.readouterr()
    assert "is not a complete row" in err and "twotier_cut_2" in out and "Traceback" not in err


def test_a_resumed_run_reports_as_the_uninterrupted_one(tmp_path, speech_wav):
    straight = train(tmp_path, speech_wav, "--print_iters", "5", "--n_samples", "0", runs="straight")
    split = train(tmp_path, speech_wav, "--print_iters", "5", "--n_samples", "0", "--stop_iters", "10", runs="split")
    assert run_main(SCRIPTS["twotier"], ["--resume", split, "--stop_iters", "20"]) == 0
    rows = [report([run], iter_windows="0-10,3-17,10-20", as_json=True) for run in (straight, split)]
    a, b = (json.loads(r) for r in rows)
    assert a["iter_windows"] == b["iter_windows"] and None not in a["iter_windows"].values()
    assert (a["best_valid"], a["best_iteration"], a["test_at_best"]) == (b["best_valid"], b["best_iteration"],
                                                                         b["test_at_best"])


def test_code_bits_count_every_16bit_value_once():
    import numpy as np
    from lib.quantize import code_bits
    for qtype in ("linear", "mulaw", "alaw"):
        assert np.exp2(code_bits(256, qtype)).sum() == pytest.approx(65536)
    assert np.exp2(code_bits(256, "linear"))[1:-1] == pytest.approx(256, abs=1.01)  # even bins of 256 values
    mulaw = code_bits(256, "mulaw")
    assert mulaw[128] < 3 < 10 < mulaw[1]  # fine near silence, coarse near full scale


def test_runs_of_different_quantizations_get_test_nll_per_16bit_sample(tmp_path):
    """A level's NLL is not comparable across quantizations: the table adds test NLL in bits per 16-bit sample,
    the test NLL plus the mean log2 of the 16-bit values in each target's level (8 for linear 256 levels)."""
    from lib import DEFAULT_DATA
    common = dict(data="/elsewhere/data/asterisk_en", q_levels=256, seq_len=128, norm="none", zero_dc=False,
                  clip_secs=8.0)  # a checkout elsewhere: the shipped data is found in this one
    lin = make_run(tmp_path, "twotier_lin_1", qtype="linear", **common)
    mu = make_run(tmp_path, "twotier_mu_2", qtype="mulaw", **common)
    assert os.path.isdir(DEFAULT_DATA)
    table = report([lin, mu], time_windows="0-2m", iter_windows="0-100").splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[-1] == "test, bits per 16-bit sample"
    lin_row, mu_row = ([c.strip() for c in row.strip("|").split("|")] for row in table[2:])
    assert float(lin_row[-1]) == pytest.approx(2.05 + 8, abs=0.01)
    assert float(mu_row[-1]) < 2.05 + 8  # mu-law's fine levels near silence, where speech mostly is
    one = report([lin, make_run(tmp_path, "twotier_lin_3", qtype="linear", dim=32, **common)], "0-2m", "0-100")
    assert "16-bit" not in one  # one quantization: the column is not needed
    gone = make_run(tmp_path, "twotier_gone_4", qtype="mulaw", **dict(common, data="/nowhere/other"))
    row = report([lin, gone], "0-2m", "0-100").splitlines()[-1]
    assert row.endswith("| \u2014 |")  # the run's data is not here: a dash (and a warning), not an error


def test_one_bad_run_among_many_is_one_warning_and_the_others_are_reported(tmp_path, capsys):
    good = make_run(tmp_path, "twotier_good_1")
    broken = make_run(tmp_path, "twotier_broken_2")
    (tmp_path / "twotier_broken_2" / "settings.json").write_text("{not json")
    no_model = make_run(tmp_path, "twotier_nomodel_3")
    json.dump({"settings": {}, "parameters": 1}, open(tmp_path / "twotier_nomodel_3" / "settings.json", "w"))
    odd_line = make_run(tmp_path, "twotier_oddline_4")
    with open(tmp_path / "twotier_oddline_4" / "metrics.jsonl", "a") as f:
        f.write("42\n")
    no_valid = make_run(tmp_path, "twotier_novalid_5", rows=[{"iteration": 1, "train_secs": 1.0, "train_bits": 8.0}])
    nan_valid = make_run(tmp_path, "twotier_nan_6", rows=[dict(ROWS[0], valid_bits=float("nan"))])
    capsys.readouterr()
    table = report([good, broken, no_model, odd_line, no_valid, nan_valid])
    err = capsys.readouterr().err.strip().splitlines()
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split("|")[1].strip() for r in rows] == ["`twotier_good_1`", "`twotier_oddline_4`"]
    assert "nan" not in table
    assert len(err) == 5 and all(line.startswith("warning: ") for line in err), err
    for name in ("broken_2", "nomodel_3", "oddline_4", "novalid_5", "nan_6"):
        assert sum(name in line for line in err) == 1, name


def test_without_windows_a_short_runs_row_has_numbers(tmp_path):
    """README's few-minutes CPU run is far shorter than the first hour: the default windows become the first and
    last tenth of the shortest run, so its own end-of-run row is not all dashes."""
    rows = [{"iteration": 100 * k, "train_secs": 8.0 * k, "train_bits": 5.0 - k / 3, "valid_bits": 5.0 - k / 4}
            for k in range(1, 4)]
    short = make_run(tmp_path, "twotier_short_1", rows=rows)
    head, _, row = report([short]).splitlines()
    assert "train 0-2.4s (time)" in head and "train 21.6-24s (time)" in head
    assert "train 0-30 (iters)" in head and "train 270-300 (iters)" in head
    assert row.count("\u2014") == 1 and row.rstrip(" |").endswith("\u2014")  # only "test at best": none here
    long_rows = [dict(r, train_secs=r["train_secs"] * 5400, iteration=r["iteration"] * 400) for r in rows]
    full = make_run(tmp_path, "twotier_full_2", rows=long_rows)  # 12 hours, 120K iterations: the defaults
    assert "train 0-1h (time)" in report([full]).splitlines()[0]


def test_the_curves_legend_fits_in_the_figure(tmp_path):
    """12 lines of runs whose settings wrap to 3-4 lines each (as with several --data paths): the figure grows, and
    the legend's column ends above the image's bottom edge instead of being cut off there."""
    import numpy as np
    from PIL import Image
    from lib.plots import plot_curves
    runs = {f"threetier big_frame_size=8\ndata=/work/clone{k}/data/asterisk_en\ndim=256 seed={k}": ROWS
            for k in range(6)}
    plot_curves(runs, str(tmp_path / "curves.png"))
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    legend_column = image[:, int(0.77 * image.shape[1]):]
    inked = np.nonzero((legend_column < 200).any(axis=1))[0]
    assert len(inked) and inked.max() < image.shape[0] - 10, (inked.max(), image.shape)
