"""The training loop's behaviour pinned: a fixed-seed CPU run of each model must log the same metrics and end with
bit-identical checkpoint tensors and samples as when tests/fingerprint.json was recorded. Restructuring the loop
must not move a bit; a change that is meant to (a new default, a new random draw) re-records it on purpose:

    python tests/test_fingerprint.py --record

Floating-point results depend on the CPU's vector instructions and on the torch version, so a fingerprint is kept
per (torch version, CPU capability); where none was recorded for this machine the test says so and skips."""
import hashlib
import json
import os
import sys

import pytest
import torch

from conftest import REPO, run_main

FINGERPRINTS = os.path.join(REPO, "tests", "fingerprint.json")
FLAGS = ["--preset", "tiny", "--clip_secs", "0.5", "--stop_iters", "24", "--print_iters", "8", "--n_samples", "2",
         "--sample_secs", "0.05", "--seed", "5"]
TIMES = {"train_secs", "wall_secs", "samples_per_sec", "rss_mb"}  # measured, not computed


def machine():
    return f"torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()}"


def digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(run_dir):
    """What a run computed: metrics rows without times, every checkpoint's tensors and state, and the samples."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in f]
    out = {"metrics": rows}
    folder = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(folder)):
        ckpt = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
        tensors = {f"model.{k}": v for k, v in ckpt["model"].items()}
        for i, s in ckpt["optimizer"]["state"].items():
            tensors.update({f"adam.{i}.{k}": v for k, v in s.items()})
        tensors["h"] = ckpt["h"]
        out[name] = {"tensors": {k: digest(v.contiguous().numpy().tobytes()) for k, v in sorted(tensors.items())},
                     "state": {k: v for k, v in ckpt["state"].items() if k not in TIMES}}
    samples = os.path.join(run_dir, "samples")
    out["samples"] = {n: digest(open(os.path.join(samples, n), "rb").read()) for n in sorted(os.listdir(samples))
                      if n.endswith(".wav")}  # the spectrogram PNGs beside them are drawn from them
    return out


def run(model, runs_dir, data):
    from baseline import main as baseline_main
    from two_tier import main as two_tier_main
    main = {"twotier": two_tier_main, "baseline": baseline_main}[model]
    assert run_main(main, [*FLAGS, "--data", data, "--runs_dir", runs_dir, "--name", "fp"]) == 0
    (name,) = os.listdir(runs_dir)
    return fingerprint(os.path.join(runs_dir, name))


@pytest.mark.parametrize("model", ["twotier", "baseline"])
def test_a_fixed_seed_run_computes_what_it_did(tmp_path, speech_wav, model):
    recorded = json.load(open(FINGERPRINTS)).get(machine())
    if recorded is None:
        pytest.skip(f"no fingerprint recorded for {machine()} (tests/fingerprint.json has "
                    f"{', '.join(json.load(open(FINGERPRINTS)))}); record one on a trusted revision with --record")
    got = run(model, str(tmp_path / "runs"), speech_wav)
    want = recorded[model]
    assert got["metrics"] == want["metrics"]
    assert got == want


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    import numpy as np
    import soundfile as sf
    sys.path.insert(0, os.path.join(REPO, "tests"))
    torch.set_num_threads(1)
    from conftest import RATE, speech
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        audio = speech(8.0)  # as the speech_wav fixture cuts it
        energy = np.convolve(audio ** 2, np.ones(RATE), mode="valid")
        start = int(np.argmax(energy[::800]) * 800)
        sf.write(wav, audio[start:start + RATE], RATE, subtype="PCM_16")
        prints = json.load(open(FINGERPRINTS)) if os.path.exists(FINGERPRINTS) else {}
        prints[machine()] = {m: run(m, os.path.join(tmp, m), wav) for m in ("twotier", "baseline")}
    with open(FINGERPRINTS, "w") as f:
        json.dump(prints, f, indent=1)
    print(f"recorded the fingerprint of {machine()} in {FINGERPRINTS}")
