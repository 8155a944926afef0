import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import RATE, REPO, run_main, speech
from lib.prepare import SPLITS, main as prepare_main


def make_sources(folder, seconds):
    """Real speech files of the given lengths; returns {relative path: samples as written}."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for i, secs in enumerate(seconds):
        audio = speech(secs, clip=i)
        rel = f"{i:02d}.wav"
        sf.write(os.path.join(folder, rel), audio, RATE, subtype="PCM_16")
        written[rel] = sf.read(os.path.join(folder, rel), dtype="float32")[0]
    return written


def read_clips(folder):
    return [sf.read(os.path.join(folder, f), dtype="float32")[0] for f in sorted(os.listdir(folder))]


def test_clips_tile_each_split_exactly(tmp_path):
    """No sample appears in two clips; none is lost except each split's final partial clip."""
    sources = make_sources(tmp_path / "src", [1.3, 0.7, 2.1, 0.4, 1.9, 1.1, 0.9, 1.6, 0.3, 2.4])
    out = tmp_path / "ds"
    assert run_main(prepare_main, [str(tmp_path / "src"), str(out), "--clip_secs", "0.5"]) == 0
    meta = json.load(open(out / "dataset.json"))
    clip_len = 4000
    assert meta["clip_len"] == clip_len
    seen = []
    for name in SPLITS:
        files = meta["splits"][name]["files"]
        assert files, name
        seen += files
        joined = np.concatenate([sources[f] for f in files])
        clips = read_clips(out / name)
        assert len(clips) == len(joined) // clip_len == meta["splits"][name]["clips"]
        assert all(len(c) == clip_len for c in clips)
        np.testing.assert_array_equal(np.concatenate(clips), joined[:len(clips) * clip_len])
    assert sorted(seen) == sorted(sources)  # every file in exactly one split


def test_split_is_seeded_and_by_file(tmp_path):
    make_sources(tmp_path / "src", [0.6] * 12)
    metas = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_main(prepare_main, [str(tmp_path / "src"), str(tmp_path / name), "--clip_secs", "0.5",
                                       "--seed", str(seed)]) == 0
        metas.append({s: json.load(open(tmp_path / name / "dataset.json"))["splits"][s]["files"] for s in SPLITS})
    assert metas[0] == metas[1]
    assert metas[0] != metas[2]


def test_mixed_rates_channels_formats_and_bad_files(tmp_path, capsys):
    src = tmp_path / "src"
    os.makedirs(src / "deeper")
    mono = speech(1.0)
    sf.write(src / "a.wav", mono, RATE, subtype="PCM_16")
    sf.write(src / "deeper" / "b.flac", np.stack([speech(2.0, clip=1)] * 2, axis=1), RATE, subtype="PCM_16")
    stereo16k = np.repeat(speech(1.0, clip=2), 2)  # 16 kHz stereo
    sf.write(src / "c.flac", np.stack([stereo16k, 0.5 * stereo16k], axis=1), 16000, subtype="PCM_16")
    sf.write(src / "d.ogg", speech(1.5, clip=3), 22050, format="OGG", subtype="VORBIS")
    sf.write(src / "silent.wav", np.zeros(8000), RATE, subtype="PCM_16")
    (src / "broken.wav").write_bytes(b"RIFF this is not a wave file")
    assert run_main(prepare_main, [str(src), str(tmp_path / "ds"), "--clip_secs", "0.25"]) == 0
    meta = json.load(open(tmp_path / "ds" / "dataset.json"))
    assert meta["skipped"] == {"broken.wav": "unreadable", "silent.wav": "silent"}
    assert "broken.wav" in capsys.readouterr().err
    total = 0
    for name in SPLITS:
        for f in sorted(os.listdir(tmp_path / "ds" / name)):
            info = sf.info(str(tmp_path / "ds" / name / f))
            assert (info.samplerate, info.channels, info.frames) == (RATE, 1, 2000)
            total += 1
    # 1 s + 2 s + 1 s (from 16 kHz) + 0.54 s (12000 samples at 22.05 kHz) = 4.54 s, in 0.25 s clips,
    # less at most one partial clip per split
    assert 18 - len(SPLITS) <= total <= 18
    assert sum(len(meta["splits"][s]["files"]) for s in SPLITS) == 4


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "out_exists", "out_inside_src"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    src, out = tmp_path / "src", tmp_path / "out"
    if case == "out_inside_src":  # a later prepare of src would take out's clips in as sources
        make_sources(src, [0.6] * 3)
        out = src / "out"
    if case not in ("missing", "out_inside_src"):
        os.makedirs(src)
    if case == "unreadable":
        (src / "x.wav").write_bytes(b"garbage")
    if case == "out_exists":
        make_sources(src, [0.6] * 3)
        os.makedirs(out)
        (out / "keep.txt").write_text("precious")
    code = run_main(prepare_main, [str(src), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ")
    if case == "out_inside_src":
        assert "is inside the source folder" in err[-1] and not (src / "out.partial").exists()
    if case == "out_exists":
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()


def test_linked_folders_are_followed_once_and_any_file_name_is_read(tmp_path):
    """A folder linked into the source is read (linked files always were); a link back up the tree is no loop;
    a file name that is not valid UTF-8 (as old archives and other systems leave them) is read as audio."""
    make_sources(tmp_path / "elsewhere", [1.0, 1.0])
    src = tmp_path / "src"
    make_sources(src, [1.0, 1.0])
    os.symlink(tmp_path / "elsewhere", src / "linked")
    os.symlink(src, src / "linked_back")  # a loop
    odd = os.path.join(os.fsencode(str(src)), b"caf\xe9.wav")
    sf.write(odd, speech(1.0, clip=3), RATE, subtype="PCM_16")
    assert run_main(prepare_main, [str(src), str(tmp_path / "ds"), "--clip_secs", "0.5"]) == 0
    meta = json.load(open(tmp_path / "ds" / "dataset.json"))
    files = sorted(f for s in meta["splits"].values() for f in s["files"])
    assert files == sorted(["00.wav", "01.wav", "linked/00.wav", "linked/01.wav", os.fsdecode(b"caf\xe9.wav")])
    assert meta["skipped"] == {}


def peak_prepare_mb(src, out):
    code = ("import resource, sys\nfrom lib.prepare import main\nmain(sys.argv[1:])\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), "--sample_rate", "1000", "--clip_secs", "8"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split("PEAK")[-1]) / 1024


def test_prepare_memory_stays_flat_in_the_corpus_length(tmp_path):
    """4 hours prepare with the peak memory of 1 hour (before, every decoded file was held: about 450 MB an hour
    at 16 kHz). Noise at 1 kHz keeps the files small: 4 hours are 58 MB as float32, which holding would show."""
    rng = np.random.default_rng(0)
    for hours, name in ((1, "one"), (4, "four")):
        os.makedirs(tmp_path / name)
        for i in range(15 * hours):  # 4-minute files
            sf.write(tmp_path / name / f"{i:03d}.wav", rng.integers(-3000, 3000, 240_000, dtype=np.int16), 1000,
                     subtype="PCM_16")
    one, four = peak_prepare_mb(tmp_path / "one", tmp_path / "ds1"), peak_prepare_mb(tmp_path / "four", tmp_path / "ds4")
    meta = json.load(open(tmp_path / "ds4" / "dataset.json"))
    assert sum(s["clips"] for s in meta["splits"].values()) == 60 * 30  # every 8 s of each 4-minute file
    assert four < one + 8, (one, four)
    assert not os.path.exists(tmp_path / "ds4" / ".decoded")
