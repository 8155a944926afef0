"""One role for every flag (lib/settings.py ROLES), read by resume, the report, --by_seed and the legends alike: a
flag a run lacks compares as the value that run used, flags that only say where or how a run writes never split a
setting, and the data is compared by its content, not by the folder it lay in."""
import glob
import importlib
import json
import os

import pytest

from conftest import REPO, run_main
from lib import MODELS
from lib.report import differing, report, short_names, summarize
from lib.settings import (BEFORE_IT_EXISTED, DROPPED, RENAMED, RESUMABLE, ROLES, as_run_did, build_parser,
                          parse_settings)
from lib.checkpoint import Resumed
from lib.run import Run
from test_seeds import DATA, make_run
from test_train import train
from two_tier import main as two_tier_main

E = os.path.join(REPO, "experiments")


def parser_of(model_id):
    script = importlib.import_module(MODELS[model_id])
    return build_parser(f"{MODELS[model_id]}.py", "", script.add_model_args, script.PRESETS), script.PRESETS


def test_every_flag_of_every_model_has_one_role():
    for model_id in MODELS:
        flags = {a.dest for a in parser_of(model_id)[0]._actions if a.dest != "help"}
        assert not flags - set(ROLES), f"{model_id}: flags without a role in lib/settings.py ROLES: {flags - set(ROLES)}"


def test_every_flag_an_old_run_lacks_says_what_that_run_did():
    """A flag added after a run was made must say what the run did without it, or the run compares as unknown."""
    for path in glob.glob(os.path.join(E, "*", "settings.json")):
        saved = json.load(open(path))
        flags = {a.dest for a in parser_of(saved["model_id"])[0]._actions if a.dest != "help"}
        lacking = flags - set(as_run_did(saved["model_id"], saved["settings"]))
        assert not lacking, f"{path} lacks {lacking}: add each to BEFORE_IT_EXISTED"
    assert not set(BEFORE_IT_EXISTED) & (set(DROPPED) | set(RENAMED))


def test_one_setting_is_one_row_though_older_runs_lack_later_flags(capsys):
    """The reproduction: the 2026-11-30 runs lack --mlp_first_relu / --frame_init, the 2026-12-02 runs of the same
    setting have them at their defaults: one setting of four runs, not two rows a reader takes as separated."""
    runs = [os.path.join(E, "twotier_cpu_time_dim128_1796041261"), os.path.join(E, "twotier_cpu_time_dim128_seed7_1796049803")] + \
        sorted(glob.glob(os.path.join(E, "twotier_cpu_time_dim128_again_*")))
    rows = [json.loads(line) for line in report(runs, as_json=True, by_seed="test_at_best").splitlines()]
    assert len(rows) == 1 and len(rows[0]["runs"]) == 4
    # the seeds made different numbers of steps in the same hours: said, not averaged without a word
    assert "machines of different speed" in rows[0]["trained"], rows[0]["trained"]
    plain = report(runs).splitlines()[0]
    assert "--mlp_first_relu" not in plain and "--frame_init" not in plain


def test_two_settings_are_two_though_one_run_lacks_the_flag():
    runs = [os.path.join(E, "twotier_cpu_time_dim128_1796041261"), os.path.join(E, "twotier_cpu_time_dim128_norelu_1796228328")]
    head = report(runs).splitlines()[0]
    assert "--mlp_first_relu" in head
    rows = report(runs + [os.path.join(E, "twotier_cpu_time_dim128_norelu_seed7_1796228328")], as_json=True,
                  by_seed="test_at_best").splitlines()
    assert [len(json.loads(r)["runs"]) for r in rows] == [1, 2]


def test_resume_compares_a_missing_flag_as_the_value_the_run_used():
    old = {"dim": 64, "frame_size": 2, "seed": 1}  # made before --mlp_first_relu
    assert as_run_did("twotier", old)["mlp_first_relu"] == "on" and "mlp_first_relu" not in as_run_did("baseline", old)
    parser, presets = parser_of("twotier")
    defaults = vars(parser.parse_args([]))
    made_before = {k: v for k, v in defaults.items() if k != "mlp_first_relu"}
    resumed = Resumed("RUN", {"model_id": "twotier", "settings": made_before})
    args = parse_settings(parser, presets, ["--resume", "RUN", "--mlp_first_relu", "on"], resumed)
    assert args.mlp_first_relu == "on"
    with pytest.raises(Exception, match="--mlp_first_relu cannot change"):
        parse_settings(parser, presets, ["--resume", "RUN", "--mlp_first_relu", "off"], resumed)


def test_where_and_how_a_run_writes_never_splits_a_setting(tmp_path):
    """Runs made by scripts/slurm_two_tier.sh (--run_dir), with --tensorboard, other samples or cadence: one setting,
    and no column for it in the plain report or the legends."""
    a = make_run(tmp_path, "a1", 1.80, 1, run_dir="/scratch/a1", tensorboard=True, n_samples=4, print_time=60.0)
    b = make_run(tmp_path, "a2", 1.81, 2, run_dir=None, tensorboard=False, n_samples=0, print_time=3600.0,
                 keep_checkpoints=2, runs_dir="elsewhere", threads=1)
    rows = report([a, b], time_windows="0-1m", iter_windows="0-100", as_json=True, by_seed="test_at_best").splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["separated"] is None and len(json.loads(rows[0])["runs"]) == 2
    head = report([a, b], time_windows="0-1m", iter_windows="0-100").splitlines()[0]
    assert head.count("--") == 1 and "--seed" in head  # the seed is the one difference
    c = make_run(tmp_path, "c", 1.80, 1, lr=0.002, n_samples=0)
    summaries = [summarize(r, [], []) for r in (a, c)]
    assert differing(summaries) == ["lr"] and short_names(summaries) == ["twotier", "twotier lr=0.002"]


def test_the_same_data_in_another_folder_is_the_same_setting(tmp_path):
    a = make_run(tmp_path, "a1", 1.80, 1, data="/data/speech")
    b = make_run(tmp_path, "a2", 1.81, 2, data="/data/speech_copy")
    rows = report([a, b], time_windows="0-1m", iter_windows="0-100", as_json=True, by_seed="test_at_best").splitlines()
    assert len(rows) == 1
    assert "--data" not in report([a, b], time_windows="0-1m", iter_windows="0-100").splitlines()[0]
    other = make_run(tmp_path, "o", 1.81, 2, data="/data/speech", fingerprint={**DATA, "valid": DATA["train"]})
    head, row = report([a, other], time_windows="0-1m", iter_windows="0-100").splitlines()[0:3:2]
    assert "--data" in head and "speech (" in row  # by its name, and the content's id


def test_what_a_session_may_change_is_what_the_roles_say():
    assert {"stop_iters", "print_iters", "tensorboard", "run_dir", "runs_dir", "name", "data"} <= RESUMABLE
    assert not {"valid_clips", "lr", "seed", "dim", "q_levels", "precision"} & RESUMABLE


def test_a_resume_that_changes_the_budget_is_recorded(tmp_path, speech_wav):
    """The reproduction: a run made with --stop_iters 6, continued with --stop_iters 8: the record says 8 and when
    it changed, and the report shows what the run trained."""
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "6", "--print_iters", "2", "--n_samples", "0")
    assert run_main(two_tier_main, ["--resume", run_dir, "--stop_iters", "8"]) == 0
    record = json.load(open(os.path.join(run_dir, "settings.json")))
    assert record["settings"]["stop_iters"] == 8
    (segment,) = record["segments"]
    assert segment["from_iteration"] == 6 and segment["changed"] == {"stop_iters": [6, 8]}
    assert segment["command"] == f"python two_tier.py --resume {run_dir} --stop_iters 8"  # as a person types it
    assert json.loads(report([run_dir], as_json=True))["iterations"] == 8


def test_the_evaluation_set_belongs_to_the_run(tmp_path, speech_wav, capsys):
    """--valid_clips chooses what the valid NLL and best.pt are measured on: a resume may not change it."""
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "2", "--n_samples", "0",
                    "--valid_clips", "1")
    capsys.readouterr()
    assert run_main(two_tier_main, ["--resume", run_dir, "--stop_iters", "4", "--valid_clips", "0"]) == 2
    assert "--valid_clips cannot change" in capsys.readouterr().err


def test_run_dir_again_continues_a_run_made_with_derived_flags(tmp_path, speech_wav, capsys):
    """--seq_len sets --n_frames: the same command again (a requeued job) continues its run, and a command with
    other flags is told how to continue the run or where to train its own."""
    argv = ["--preset", "tiny", "--data", speech_wav, "--seq_len", "64", "--run_dir", str(tmp_path / "X"),
            "--print_iters", "2", "--n_samples", "0"]
    assert run_main(two_tier_main, argv + ["--stop_iters", "2"]) == 0
    assert run_main(two_tier_main, argv + ["--stop_iters", "4"]) == 0
    assert Run(str(tmp_path / "X")).metrics()[-1]["iteration"] == 4
    capsys.readouterr()
    assert run_main(two_tier_main, argv + ["--stop_iters", "6", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 differs" in err and f"--resume {tmp_path / 'X'}" in err and "new --run_dir" in err


def test_one_line_says_which_run_cut_the_windows(tmp_path, capsys):
    short = make_run(tmp_path, "short", 1.80, 1)
    rows = [{"iteration": 100 * k, "train_secs": 60.0 * k, "train_bits": 3.0, "valid_bits": 3.0} for k in range(1, 11)]
    long = os.path.join(make_run(tmp_path, "long", 1.80, 2))
    with open(os.path.join(long, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    capsys.readouterr()
    report([short, long])
    err = capsys.readouterr().err
    assert "cut by the shortest run, short" in err and "--time_windows" in err and "--iter_windows" in err
    report([long])  # one run: nothing to say
    assert capsys.readouterr().err == ""
