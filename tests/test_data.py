"""Datasets on disk: memory-mapped splits give the same batches as the in-memory path did, clips of unequal length
are walked whole, per-clip options match lib.quantize, and memory stays flat however many hours the data holds."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import RATE, REPO, speech
from lib.audio import find_audio
from lib import DEFAULT_DATA
from lib.data import ChunkBatches, Segments, eval_chunks, load_splits
from lib.quantize import normalize, quantize


def in_memory_levels(folder, q_levels=256, qtype="linear", zero_dc=False, norm="none"):
    """The split as the previous version held it: every clip decoded to float32, quantized whole, in memory."""
    clips = np.stack([sf.read(p, dtype="float32")[0] for p in find_audio(folder)[0]])
    return quantize(normalize(torch.from_numpy(clips), zero_dc, norm), q_levels, qtype)


def test_memory_mapped_batches_equal_the_in_memory_ones_on_the_shipped_data():
    splits, rate = load_splits(DEFAULT_DATA)
    assert rate == RATE and isinstance(splits["train"].pcm, np.memmap)
    train = splits["train"]
    train.set_quantization(256, "linear")
    old = ChunkBatches(in_memory_levels(os.path.join(DEFAULT_DATA, "train")), 32, 128, 2, 256, seed=123)
    new = ChunkBatches(train, 32, 128, 2, 256, seed=123)
    assert new.chunks_per_clip == old.chunks_per_clip == 500
    for it in (0, 1, 499, 500, 2501, 500 * 5 + 7):  # within a clip, the next batch of clips, the next epoch
        (a, ra), (b, rb) = old(it), new(it)
        assert ra == rb and a.dtype == b.dtype == torch.int64 and torch.equal(a, b), it
    held = ChunkBatches(train.on_device(torch.device("cpu"), 256), 32, 128, 2, 256, seed=123)  # as on a GPU
    assert held.segments.split.pcm.dtype == torch.uint8
    for it in (0, 499, 2501):
        assert torch.equal(held(it)[0], new(it)[0])
    valid = splits["valid"]
    valid.set_quantization(256, "linear")
    old_eval = list(eval_chunks(in_memory_levels(os.path.join(DEFAULT_DATA, "valid")), 4, 128, 2, 256, 2048))
    new_eval = list(eval_chunks(valid, 4, 128, 2, 256, 2048))
    assert len(old_eval) == len(new_eval) and all(torch.equal(a, b) and ra == rb
                                                   for (a, ra), (b, rb) in zip(old_eval, new_eval))


@pytest.mark.parametrize("zero_dc, norm, qtype", [(True, "none", "linear"), (False, "minmax", "mulaw"),
                                                  (True, "minmax", "alaw")])
def test_per_clip_options_match_lib_quantize(tmp_path, zero_dc, norm, qtype):
    make_dataset(tmp_path / "ds", {"train": [1.0, 1.0], "valid": [1.0], "test": [1.0]})
    splits, _ = load_splits(str(tmp_path / "ds"))
    splits["train"].set_quantization(256, qtype, zero_dc, norm)
    new = Segments(splits["train"], 100).levels([0, 1], 0, RATE, 256)
    old = in_memory_levels(tmp_path / "ds" / "train", 256, qtype, zero_dc, norm)
    assert (new != old).float().mean() < 1e-4  # the clip's mean may round differently at a level's edge


def make_dataset(folder, seconds, noise=False):
    """A prepared-dataset layout: split -> list of clip lengths (s); real speech, or int16 noise for bulk."""
    rng = np.random.default_rng(0)
    for split, lengths in seconds.items():
        os.makedirs(folder / split)
        for i, secs in enumerate(lengths):
            audio = (rng.integers(-3000, 3000, int(secs * RATE), dtype=np.int16) if noise else
                     speech(secs, clip=i % 5))
            sf.write(folder / split / f"{i:05d}.wav", audio, RATE, subtype="PCM_16")


def test_clips_of_unequal_length_are_walked_whole(tmp_path, capsys):
    make_dataset(tmp_path / "ds", {"train": [1.0, 2.5, 3.2], "valid": [1.0], "test": [1.0]})
    splits, _ = load_splits(str(tmp_path / "ds"))
    train = splits["train"]
    train.set_quantization(256, "linear")
    batches = ChunkBatches(train, 2, 400, 2, 256, seed=0)
    assert "train clips differ in length" in capsys.readouterr().err
    segments = batches.segments
    assert segments.length == 8000 and len(segments) == 1 + 2 + 3  # 1 s segments: each clip's whole seconds
    files = [in_memory_levels_of(p) for p in find_audio(tmp_path / "ds" / "train")[0]]
    for row, (clip, start) in enumerate(zip(segments.clip, segments.start)):
        assert torch.equal(segments.levels([row], 0, 8000, 256)[0], files[clip][start:start + 8000])
    assert segments.levels([1], -2, 4, 256)[0, :2].tolist() == [128, 128]  # q_zero before a segment's start
    # ... also before a segment that starts inside its clip: a chunk that starts from h0 starts as sampling does
    assert (segments.clip[2], segments.start[2]) == (1, 8000)
    assert segments.levels([2], -2, 4, 256)[0].tolist() == [128, 128] + files[1][8000:8002].tolist()
    assert segments.levels([2], -5, 3, 256)[0].tolist() == [128] * 3
    for chunk, reset in eval_chunks(train, 6, 400, 2, 256, 800):
        if reset:
            assert (chunk[:, :2] == 128).all()


def in_memory_levels_of(path):
    return quantize(torch.from_numpy(sf.read(path, dtype="float32")[0]).double())


def peak_rss_mb(data, tmp_path):
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
            "try: runpy.run_path('two_tier.py', run_name='__main__')\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, "two_tier.py", "--preset", "tiny", "--data", str(data),
                          "--runs_dir", str(tmp_path / "runs"), "--n_samples", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split("PEAK")[-1]) / 1024


def test_memory_stays_flat_however_many_hours_the_dataset_holds(tmp_path):
    """Four hours of audio (920 MB as the int64 levels the previous version held, 460 MB as float32) train with
    the same peak memory as three minutes, within 100 MB: the splits are read memory-mapped, per batch."""
    small, big = tmp_path / "small", tmp_path / "big"
    make_dataset(small, {"train": [60] * 3, "valid": [2] * 2, "test": [2] * 2}, noise=True)
    make_dataset(big, {"train": [60] * 240, "valid": [2] * 2, "test": [2] * 2}, noise=True)
    small_mb, big_mb = peak_rss_mb(small, tmp_path / "a"), peak_rss_mb(big, tmp_path / "b")
    assert os.path.getsize(next((big / ".cache").glob("train_*.pcm"))) == 240 * 60 * RATE * 2
    assert big_mb < small_mb + 100, (small_mb, big_mb)
