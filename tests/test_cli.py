"""What a newcomer meets first: every --help shows every default, README's commands parse as written, and a run
says what it is doing when its output is not a terminal."""
import json
import os
import re
import shlex

import pytest
import torch

import baseline
import bench
import generate
import lib.download
import lib.prepare
import lib.report
import lib.terminal
import lib.settings
import lib.train
import three_tier
import two_tier
from conftest import REPO, run_main
from test_train import train

MAINS = {"two_tier.py": two_tier.main, "three_tier.py": three_tier.main, "baseline.py": baseline.main, "generate.py": generate.main,
         "lib.prepare": lib.prepare.main, "bench.py": bench.main, "lib.download": lib.download.main,
         "lib.report": lib.report.main}
PARSERS = {
    "two_tier.py": lambda: lib.settings.build_parser("two_tier.py", "", two_tier.add_model_args, two_tier.PRESETS),
    "baseline.py": lambda: lib.settings.build_parser("baseline.py", "", baseline.add_model_args, baseline.PRESETS),
    "three_tier.py": lambda: lib.settings.build_parser("three_tier.py", "", three_tier.add_model_args,
                                                       three_tier.PRESETS),
    "generate.py": generate.build_parser, "lib.prepare": lib.prepare.build_parser, "bench.py": bench.build_parser,
    "lib.download": lib.download.build_parser, "lib.report": lib.report.build_parser,
}


@pytest.mark.parametrize("name", sorted(MAINS))
def test_help_shows_every_default(name, capsys):
    assert run_main(MAINS[name], ["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python {'-m ' if name.startswith('lib.') else ''}{name}")
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]  # one chunk per flag and its help
    assert len(options) > 3
    for chunk in options:
        if not chunk.startswith("-h"):
            said = " ".join(chunk.split())
            assert said.count("(default") == 1, chunk  # said once
    assert "SPEC" not in text


@pytest.mark.parametrize("name", ["two_tier.py", "generate.py", "lib.report"])
def test_dashed_flags_are_accepted_and_a_typo_gets_a_suggestion(name):
    parser = PARSERS[name]()
    flag = {"two_tier.py": "--frame_size", "generate.py": "--plot_secs", "lib.report": "--time_windows"}[name]
    first = [] if name == "two_tier.py" else ["RUN"]
    value = "0-5m" if name == "lib.report" else "2"
    assert vars(parser.parse_args(first + [flag.replace("_", "-"), value])) == \
        vars(parser.parse_args(first + [flag, value]))
    assert vars(parser.parse_args(first + [flag.replace("_", "-") + "=" + value]))[flag[2:]] == \
        vars(parser.parse_args(first + [flag, value]))[flag[2:]]


def test_a_mistyped_flag_names_the_nearest(capsys):
    assert run_main(two_tier.main, ["--frame-sise", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean --frame_size?" in err[0]


def test_preset_help_says_what_it_sets(capsys):
    run_main(two_tier.main, ["--help"])
    assert "tiny = --frame_size 2 --n_frames 16 --dim 32" in " ".join(capsys.readouterr().out.split())


def readme_commands():
    """Every `python ...` command in README's code blocks, as argv lists (comments and pipes cut off, lines ending
    in a backslash joined), and the script's part of every `torchrun ... SCRIPT.py ...` command."""
    text = open(os.path.join(REPO, "README.md")).read()
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                argv = shlex.split(part.split("|")[0])
                if argv[:1] == ["torchrun"]:
                    yield argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
                if argv[:1] == ["python"] and argv[1:3] != ["-m", "pytest"]:
                    yield argv[2:] if argv[1] == "-m" else argv[1:]


def test_readme_commands_parse():
    commands = list(readme_commands())
    assert len(commands) >= 10
    for script, *argv in commands:
        args = PARSERS[script]().parse_args(argv)  # an unknown flag or bad choice exits here
        if script in ("two_tier.py", "baseline.py") and not args.resume:
            assert run_main(MAINS[script], [*argv, "--dry_run"]) == 0, argv  # and the values are accepted


def test_progress_lines_without_a_terminal(tmp_path, speech_wav, capsys, monkeypatch):
    """Under nohup or with output to a file there is no bar: a plain progress line instead (every 5 minutes;
    here every step), and once the measured speed with when the first interval and the end come."""
    monkeypatch.setattr(lib.terminal, "PROGRESS_SECS", 0)
    train(tmp_path, speech_wav, "--n_samples", "0")
    out = capsys.readouterr().out
    (speed,) = [s for s in out.splitlines() if s.startswith("speed: ")]
    assert "s per iteration" in speed and "the first interval (valid NLL, checkpoint, samples) in about" in speed
    progress = [s for s in out.splitlines() if s.startswith("progress: iteration")]
    assert len(progress) >= 15 and "of training left" in progress[-1]


def test_speed_line_on_a_device_that_runs_ahead_times_whole_waits():
    """On CUDA the loop waits for the device every SYNC_STEPS steps, and the steps in between only queue work: the
    speed line comes at a wait and times only stretches that end in one (here 16 steps of 0.1 s each)."""
    import argparse
    lines, sync = [], lib.train.SYNC_STEPS
    args = argparse.Namespace(stop_iters=0, stop_time=1.0, print_iters=0, print_time=3600.0)
    state, interval = {"iteration": 0, "train_secs": 0.0}, {"secs": 0.0, "steps": 0, "bits": 0.0}
    progress = lib.terminal.Progress(args, state, lines.append, torch.device("cuda"), 1000, shown=False)
    for i in range(1, 2 * sync + 1):
        waited = i % sync == 0
        secs = 0.1 * sync if waited else 0.0  # the wait takes the time of the steps queued since the last one
        state["iteration"], interval["steps"] = i, i
        state["train_secs"] += secs
        interval["secs"] += secs
        progress.step(state, interval, secs, synced=waited)
        assert len(lines) == (i == 2 * sync), i  # not at the first wait: its steps began before the timing
    assert lines[0].startswith("speed: 0.100 s per iteration (10,000 samples/s)"), lines


def test_bench_train_prints_both_steps_and_json(capsys):
    """python bench.py train on the CPU (tiny model): both steps timed, their rates against the matmul rate,
    and a JSON line for each (bf16 is skipped without CUDA)."""
    assert run_main(bench.main, ["train", "--dim", "16", "--n_rnn", "1", "--batch_size", "4", "--steps", "2",
                                     "--warmup", "1", "--repeats", "1", "--precision", "fp32", "bf16",
                                     "--threads", "1", "--full"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "MFLOP per trained sample" in out[0] and "bf16: skipped (CUDA only)" in out
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["step"] for r in rows] == ["plain", "sync-free", "tables"]
    assert all(r["samples_per_sec"] > 0 for r in rows)
    # a fraction of a physical limit only where the FLOPs counted are the FLOPs done: never for the tables
    assert all(0 < r["fraction_of_matmul"] < 1 for r in rows[:2]) and rows[2]["fraction_of_matmul"] is None
    tables = next(line for line in out if line.startswith("fp32 tables"))
    assert "of the matmul rate" not in tables and "effective" in tables


def test_bench_train_on_the_cpu_is_quick_by_default_and_says_what_it_skipped(capsys):
    """Its defaults are for a GPU: on a 2-core CPU they ran for more than 15 minutes at --dim 256."""
    assert run_main(bench.main, ["train", "--dim", "16", "--n_rnn", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("quick CPU run: batch 32, 1 warm-up + 2 timed steps, best of 1; the plain step skipped. --full "
                      "for the whole sweep (--batch_size 128, --steps 20, --warmup 5, --repeats 3, every step kind)")
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [(r["step"], r["batch_size"]) for r in rows] == [("sync-free", 32), ("tables", 32)]


def test_a_speed_line_proven_wrong_is_said_again():
    """README's few-minutes CPU run measured its first steps at 0.79 s and then ran at 0.08 s: the estimate was 6x
    too long. After 50 more steps a speed off by over 1.5x is said again, with the time to the end."""
    import argparse
    lines = []
    args = argparse.Namespace(stop_iters=300, stop_time=12.0, print_iters=100, print_time=3600.0)
    state, interval = {"iteration": 0, "train_secs": 0.0}, {"secs": 0.0, "steps": 0, "bits": 0.0}
    progress = lib.terminal.Progress(args, state, lines.append, torch.device("cpu"), 1000, shown=False)
    for i in range(1, 80):
        secs = 0.8 if i <= 6 else 0.08
        state["iteration"], interval["steps"] = i, i
        state["train_secs"] += secs
        interval["secs"] += secs
        progress.step(state, interval, secs, synced=True)
    assert len(lines) == 2 and lines[0].startswith("speed: 0.800 s per iteration"), lines
    assert lines[1].startswith("speed over the last 50 steps (the first were 10.0 times as slow): 0.080 s per iteration")
    assert "the end of the run in about 20 s" in lines[1]  # (300 - 56) steps of 0.08 s: 19.5 s


def test_a_slow_first_step_is_said_at_once_and_only_a_slow_model_is_called_sized_for_a_gpu():
    """The default model on a CPU: about 30 s a step. Its first step's time is said at once, with what an interval
    and the run will take; the hint toward the CPU example comes with it. A tiny model with a long interval
    (--print_iters 100000) steps fast: it gets the speed line, never the hint."""
    import argparse
    state, interval = {"iteration": 0, "train_secs": 0.0}, {"secs": 0.0, "steps": 0, "bits": 0.0}
    lines = []
    args = argparse.Namespace(stop_iters=0, stop_time=12.0, print_iters=0, print_time=3600.0)
    progress = lib.terminal.Progress(args, state, lines.append, torch.device("cpu"), 8192, shown=False)
    state["iteration"], interval["steps"], interval["secs"] = 1, 1, 30.0
    progress.step(state, interval, 30.0, synced=True)
    assert lines[0].startswith("the first step (with its warm-up): 30.000 s per iteration"), lines
    assert "the first interval (valid NLL, checkpoint, samples) in about 60 min" in lines[0]
    assert lines[1].startswith("note: at 30 s a step this model is sized for a GPU") and len(lines) == 2
    lines.clear()
    args = argparse.Namespace(stop_iters=0, stop_time=12.0, print_iters=100000, print_time=3600.0)
    state, interval = {"iteration": 0, "train_secs": 0.0}, {"secs": 0.0, "steps": 0, "bits": 0.0}
    progress = lib.terminal.Progress(args, state, lines.append, torch.device("cpu"), 256, shown=False)
    for i in range(1, 10):
        state["iteration"], interval["steps"] = i, i
        progress.step(state, interval, 0.004, synced=True)
    assert len(lines) == 1 and lines[0].startswith("speed: 0.004 s per iteration"), lines
