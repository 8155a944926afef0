"""The decoded cache (lib/cache.py) never serves wrong samples: builds that race in real processes (one killed with
SIGKILL), damaged files, a replaced file with its old time, superseded caches, and datasets where no cache can be
written. The truth each case is compared with is the audio files decoded directly with soundfile."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import soundfile as sf

from conftest import RATE, REPO
from lib.audio import find_audio
from lib import DEFAULT_DATA
from lib.data import load_splits
from test_data import make_dataset

SPLIT_NAMES = ("train", "valid", "test")
# a child process: load the splits, print each one's CRC-32 of what it maps (not what its index says)
LOAD = ("import json, os, sys, zlib, numpy as np\nfrom lib.data import load_splits\n"
        "splits, _ = load_splits(sys.argv[1])\n"
        "crc = {k: zlib.crc32(np.asarray(s.pcm).tobytes()) for k, s in splits.items()}\n"
        "name = getattr(splits['train'].pcm, 'filename', None)\n"
        "crc['inode'] = os.stat(name).st_ino if name else None  # of the file mapped\n"
        "print('CRC', json.dumps(crc))\n")


def truth(dataset):
    """Per split, the CRC-32 of its files decoded directly to 16-bit PCM, end to end (compared with a child's
    answer, whose 'inode' is left out)."""
    out = {}
    for name in SPLIT_NAMES:
        crc = 0
        for path in find_audio(os.path.join(dataset, name))[0]:
            audio = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1)
            crc = zlib.crc32(np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16).tobytes(), crc)
        out[name] = crc
    return out


def copy_of_shipped(folder, train_clips=12):
    """A fresh copy of the shipped speech (a part of its train split: the build takes seconds, not tens)."""
    for name in SPLIT_NAMES:
        os.makedirs(folder / name)
        for path in find_audio(os.path.join(DEFAULT_DATA, name))[0][:train_clips]:
            shutil.copy(path, folder / name)
    return str(folder)


def start(dataset, **kw):
    return subprocess.Popen([sys.executable, "-c", LOAD, dataset], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    crc = json.loads(out.split("CRC", 1)[1])
    return crc, out + err, crc.pop("inode")


def wait_for_temporary_file(dataset, p):
    """Until a builder has begun writing (a temporary file in .cache/)."""
    cache = os.path.join(dataset, ".cache")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if os.path.isdir(cache) and any(".tmp" in f for f in os.listdir(cache)):
            return
        time.sleep(0.01)
    raise AssertionError("no build started")


def cache_files(dataset):
    return sorted(os.listdir(os.path.join(dataset, ".cache")))


def waiting(p):
    """Until the process says it waits for another one's build (it then blocks on the lock)."""
    line = p.stdout.readline()
    assert "waiting for another process" in line, line + p.stderr.read()[-2000:]


def racing_builds(dataset):
    """Two real processes loading a fresh dataset at once, deterministically interleaved: the first is stopped
    (SIGSTOP) as soon as it has begun writing the cache, and the second started until it waits for the first."""
    first = start(dataset)
    wait_for_temporary_file(dataset, first)
    first.send_signal(signal.SIGSTOP)
    second = start(dataset)
    waiting(second)
    return first, second


def test_two_builds_at_once_build_once_and_both_read_the_right_samples(tmp_path):
    dataset = copy_of_shipped(tmp_path / "ds")
    first, second = racing_builds(dataset)
    first.send_signal(signal.SIGCONT)
    (a, said_a, inode_a), (b, said_b, inode_b) = finish(first), finish(second)
    assert a == b == truth(dataset)
    assert inode_a == inode_b  # the second mapped the file the first built: one build
    assert "warning" not in said_a + said_b, said_a + said_b
    assert len(cache_files(dataset)) == 1 + 2 * 3  # the lock, and one PCM file and index per split


def test_the_waiting_process_killed_leaves_the_build_whole(tmp_path):
    """The hostile report: the second of two racing processes killed with SIGKILL (before, 40 % of the train
    samples were stored as zeros, for good)."""
    dataset = copy_of_shipped(tmp_path / "ds")
    first, second = racing_builds(dataset)
    second.send_signal(signal.SIGKILL)
    second.wait()
    first.send_signal(signal.SIGCONT)
    got, said, _ = finish(first)
    assert got == truth(dataset), said
    got, said, _ = finish(start(dataset))  # later runs read what was stored
    assert got == truth(dataset) and "warning" not in said, said
    assert not any(".tmp" in f for f in cache_files(dataset))


def test_the_builder_killed_midway_the_waiting_one_builds_whole(tmp_path):
    dataset = copy_of_shipped(tmp_path / "ds")
    first, second = racing_builds(dataset)
    first.send_signal(signal.SIGKILL)  # the kernel releases its lock
    first.wait()
    got, said, _ = finish(second)
    assert got == truth(dataset), said
    assert not any(".tmp" in f for f in cache_files(dataset))
    got, said, _ = finish(start(dataset))
    assert got == truth(dataset) and "warning" not in said, said


def damage_and_load(dataset, capsys, damage):
    load_splits(dataset)
    pcm = sorted((p for p in os.listdir(os.path.join(dataset, ".cache")) if p.startswith("train_")))
    damage(*(os.path.join(dataset, ".cache", p) for p in pcm))  # (index, pcm)
    capsys.readouterr()
    splits, _ = load_splits(dataset)
    err = capsys.readouterr().err
    return {k: zlib.crc32(np.asarray(s.pcm).tobytes()) for k, s in splits.items()}, err


def truncate(index, pcm):
    os.truncate(pcm, os.path.getsize(pcm) // 2)


def empty(index, pcm):
    os.truncate(pcm, 0)


def garbage_index(index, pcm):
    with open(index, "wb") as f:
        f.write(b"not an index")


def overwrite_same_size(index, pcm):
    size = os.path.getsize(pcm)
    with open(pcm, "r+b") as f:
        f.write(np.random.default_rng(0).integers(-3000, 3000, size // 2, dtype=np.int16).tobytes())


def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, capsys):
    make_dataset(tmp_path / "ds", {"train": [1.0, 1.0], "valid": [1.0], "test": [1.0]})
    dataset = str(tmp_path / "ds")
    expected = truth(dataset)
    for damage in (truncate, empty, garbage_index, overwrite_same_size):
        got, err = damage_and_load(dataset, capsys, damage)
        assert got == expected, damage.__name__
        warnings = [line for line in err.splitlines() if line.startswith("warning")]
        assert len(warnings) == 1 and "the cache of" in warnings[0] and "rebuilding" in warnings[0], err


def shifted_offset(index, pcm):
    """A valid archive whose clip boundaries moved by 5 samples (the total unchanged): the PCM still matches."""
    with np.load(index) as f:
        arrays = dict(f)
    arrays["offsets"][1] += 5
    np.savez(index, **arrays)


def changed_stats(index, pcm):
    """--norm minmax and --zero_dc read the per-clip statistics: a changed mean would move every level."""
    with np.load(index) as f:
        arrays = dict(f)
    arrays["stats"][0, 0] += 0.01
    np.savez(index, **arrays)


def test_a_damaged_index_that_still_loads_is_rebuilt(tmp_path, capsys):
    make_dataset(tmp_path / "ds", {"train": [1.0, 0.5], "valid": [1.0], "test": [1.0]})
    dataset = str(tmp_path / "ds")
    splits, _ = load_splits(dataset)
    expected = {k: (s.offsets.tolist(), s.stats.tolist()) for k, s in splits.items()}
    for damage in (shifted_offset, changed_stats):
        damage_and_load(dataset, capsys, damage)  # warns and rebuilds
        splits, _ = load_splits(dataset)
        assert {k: (s.offsets.tolist(), s.stats.tolist()) for k, s in splits.items()} == expected, damage.__name__
    got, err = damage_and_load(dataset, capsys, shifted_offset)
    assert "does not match its checksum (clip offsets or statistics changed)); rebuilding it" in err


def test_a_replaced_file_with_its_old_time_is_seen(tmp_path):
    make_dataset(tmp_path / "ds", {"train": [1.0, 1.0], "valid": [1.0], "test": [1.0]})
    dataset = str(tmp_path / "ds")
    splits, _ = load_splits(dataset)
    first = zlib.crc32(np.asarray(splits["train"].pcm).tobytes())
    path = tmp_path / "ds" / "train" / "00000.wav"
    st = os.stat(path)
    other = np.random.default_rng(1).integers(-3000, 3000, RATE, dtype=np.int16)
    sf.write(tmp_path / "other.wav", other, RATE, subtype="PCM_16")
    assert os.path.getsize(tmp_path / "other.wav") == st.st_size
    shutil.copyfile(tmp_path / "other.wav", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -a and tar x leave it
    splits, _ = load_splits(dataset)
    now = zlib.crc32(np.asarray(splits["train"].pcm).tobytes())
    assert now != first and now == truth(dataset)["train"]
    assert np.array_equal(np.asarray(splits["train"].pcm[:RATE]), other)
    # the superseded cache of train is removed; valid and test are as they were
    assert sum(f.startswith("train_") for f in cache_files(dataset)) == 2


def test_where_no_cache_can_be_written_the_audio_is_read_once_and_nothing_is_left(tmp_path):
    make_dataset(tmp_path / "ds", {"train": [1.0, 1.0], "valid": [1.0], "test": [1.0]})
    dataset = str(tmp_path / "ds")
    (tmp_path / "ds" / ".cache").write_text("a file where the cache folder would go")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, "-c", LOAD, dataset], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, TMPDIR=str(tmp)), timeout=300)
    assert p.returncode == 0, p.stderr
    assert {k: v for k, v in json.loads(p.stdout.split("CRC", 1)[1]).items() if k != "inode"} == truth(dataset)
    assert p.stderr.count("warning") == 1 and "cannot write a cache beside" in p.stderr, p.stderr
    assert os.listdir(tmp) == []  # the temporary files had no names, and are gone with the process


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # bytes: smaller than one split's cache


def test_a_write_error_while_caching_is_a_warning_not_a_traceback(tmp_path):
    make_dataset(tmp_path / "ds", {"train": [8.0, 8.0], "valid": [1.0], "test": [1.0]})
    dataset = str(tmp_path / "ds")
    p = subprocess.run([sys.executable, "-c", LOAD, dataset], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=limit_file_size, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert {k: v for k, v in json.loads(p.stdout.split("CRC", 1)[1]).items() if k != "inode"} == truth(dataset)
    assert "cannot write a cache beside" in p.stderr
    assert not any(".tmp" in f for f in cache_files(dataset))
