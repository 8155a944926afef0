"""--tensorboard, read back with TensorBoard's own reader (EventAccumulator): every interval's scalars equal the
metrics rows, the samples as audio of the right length and rate, spectrograms, the flags; after a kill -9 and a
resume no interval appears twice; and a run without the flag never imports tensorboard."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--preset", "tiny", "--device", "cpu", "--print_iters", "5", "--n_samples", "2", "--sample_secs", "0.05"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def events(run_dir):
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"audio": 0, "images": 0, "scalars": 0,
                                                                                 "tensors": 0})
    acc.Reload()
    return acc


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(argv):
    return subprocess.run([sys.executable, "two_tier.py", *TINY, *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_every_interval_in_tensorboard_and_a_kill_9_resumed_logs_none_twice(tmp_path, speech_wav):
    run_dir = tmp_path / "run"
    command = [sys.executable, "two_tier.py", *TINY, "--data", speech_wav, "--tensorboard", "--run_dir", str(run_dir),
               "--stop_iters"]
    first = subprocess.run(command + ["15"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr  # its events up to 15 written: resuming logs 15 again, purged once
    p = subprocess.Popen(command + ["30"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(run_dir / "checkpoints" / "it0000025.pt"):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # somewhere in the interval's end at 25: before, during or after its events
    p.wait(timeout=60)
    again = subprocess.run(command + ["30"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    acc, logged = events(run_dir), rows(run_dir)
    assert [r["iteration"] for r in logged] == [5, 10, 15, 20, 25, 30]
    for key, tag in (("train_bits", "nll/train_bits"), ("valid_bits", "nll/valid_bits"), ("grad_norm", "train/grad_norm")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [5, 10, 15, 20, 25, 30], tag  # each interval once, in order
        assert [v for _, v in got] == pytest.approx([r[key] for r in logged], rel=1e-6), tag
    assert [e.value for e in acc.Scalars("time/train_hours")] == pytest.approx([r["train_secs"] / 3600 for r in logged])
    tests = [(r["iteration"], r["test_bits"]) for r in logged if "test_bits" in r]  # each session's end
    assert [e.step for e in acc.Scalars("nll/test_bits")] == [t for t, _ in tests] == [15, 30]
    assert [e.value for e in acc.Scalars("nll/test_bits")] == pytest.approx([v for _, v in tests], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3] * 6)
    audio = acc.Audio("samples/0")
    assert [a.step for a in audio] == [5, 10, 15, 20, 25, 30]
    assert {a.sample_rate for a in audio} == {8000} and {a.length_frames for a in audio} == {400}  # 0.05 s at 8 kHz
    assert [i.step for i in acc.Images("spectrograms/1")] == [5, 10, 15, 20, 25, 30]
    flags = acc.Tensors("flags/text_summary")
    assert len(flags) == 1 and b"--tensorboard True" in flags[0].tensor_proto.string_val[0]


def test_a_run_without_the_flag_never_imports_tensorboard(tmp_path, speech_wav):
    code = ("import sys, two_tier\n"
            "try:\n    two_tier.main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('tensorboard' in sys.modules, any(m.startswith('torch.utils.tensorboard') for m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code, *TINY, "--data", speech_wav, "--stop_iters", "5", "--runs_dir",
                        str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False False"
    assert not any(os.path.exists(os.path.join(tmp_path, r, "tensorboard")) for r in os.listdir(tmp_path))


def test_a_run_continued_with_the_flag_shows_every_interval_of_its_record(tmp_path, speech_wav):
    """The reproduction: made without --tensorboard, continued with it (--run_dir R --tensorboard): the intervals
    trained without the flag and the flags text are in the event files too, each once; --no_tensorboard turns it
    off again."""
    run_dir = tmp_path / "run"
    command = ["--data", speech_wav, "--run_dir", str(run_dir), "--stop_iters"]
    assert train(command + ["10"]).returncode == 0
    again = train(command + ["15", "--tensorboard"])
    assert again.returncode == 0, again.stderr
    acc = events(run_dir)
    assert [e.step for e in acc.Scalars("nll/valid_bits")] == [5, 10, 15]
    assert [e.value for e in acc.Scalars("nll/valid_bits")] == pytest.approx([r["valid_bits"] for r in rows(run_dir)])
    assert [a.step for a in acc.Audio("samples/1")] == [5, 10, 15]
    assert len(acc.Tensors("flags/text_summary")) == 1
    off = train(["--resume", str(run_dir), "--stop_iters", "20", "--no_tensorboard"])
    assert off.returncode == 0, off.stderr
    assert [e.step for e in events(run_dir).Scalars("nll/valid_bits")] == [5, 10, 15]
