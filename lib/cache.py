"""The decoded cache of a dataset's splits, in `<dataset>/.cache/`, and the data's fingerprint.

Each split is decoded once: all its clips end to end as one file of 16-bit PCM (2 bytes a sample, opened
memory-mapped by lib/data.py) and a small index (clip offsets, each clip's mean, min and max, the rate, and a
CRC-32 of the PCM file, and one of the index itself). Derived data is not trusted by its name:
- the key in the file names changes whenever a file of the split may have changed: each file's path, size,
  modification time and change time (ctime moves at every write and cannot be set back: `cp -p`, `rsync -a`
  and `tar x` restore only the modification time);
- one builder at a time (an exclusive lock on `.cache/lock`, released by the kernel if the builder is killed),
  writing to a unique temporary name that is renamed when complete, so a reader never maps a partial file;
- the index is checked against its own CRC-32, and what is mapped against the index, at every start (length and
  CRC-32, about 1.5 GB/s): a damaged or partial cache, its clip offsets or statistics included, is rebuilt with one
  warning line;
- the caches a rebuild supersedes, and temporary files of killed builders, are removed.
Where no cache can be written (a read-only dataset, a full disk), each split is decoded into an unnamed
temporary file (removed by the kernel when the process ends, however it ends), or into memory if even that
fails; one warning says so.
"""
import fcntl
import hashlib
import json
import os
import tempfile
import zlib

import numpy as np
import torch

from lib import UserError, warn
from lib.audio import BadAudio, read_mono

VERSION = 3  # of the cache's format: a new one makes new keys (1 stored no checksum, 2 none of its index)
BLOCK = 1 << 24  # bytes per read when checksumming


class Damaged(Exception):
    """A cache whose files do not match its index."""


def split_key(folder, paths):
    """Identifies the split's files as they are now (see the module docstring)."""
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((os.path.relpath(p, folder), st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return hashlib.sha1(json.dumps([VERSION, stats]).encode()).hexdigest()[:16]


def crc32_of(f):
    crc = 0
    while block := f.read(BLOCK):
        crc = zlib.crc32(block, crc)
    return crc


def open_cached(folder, paths):
    """(int16 PCM, offsets, stats, rate, crc32) of the split in `folder`, through its cache; built on first use,
    rebuilt when stale or damaged. Falls back to an unnamed temporary file where no cache can be written."""
    cache_dir = os.path.join(os.path.dirname(folder), ".cache")
    split = os.path.basename(folder)
    name = f"{split}_{split_key(folder, paths)}"
    try:
        return read_cache(cache_dir, name)
    except (FileNotFoundError, Damaged):
        pass  # built below, under the lock
    made = not os.path.isdir(cache_dir)
    dataset = os.stat(os.path.dirname(cache_dir))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with Lock(os.path.join(cache_dir, "lock"), folder):
            try:
                return read_cache(cache_dir, name)  # another process may have built it while this one waited
            except FileNotFoundError:
                pass
            except Damaged as e:
                warn(f"the cache of {folder} is damaged ({e}); rebuilding it")
            remove_leftovers(cache_dir, split)
            build(folder, paths, cache_dir, name)
            return read_cache(cache_dir, name)
    except OSError as e:
        cannot_cache(folder, e)
    except UserError:  # unusable audio: the dataset is left as it was
        if made and os.listdir(cache_dir) == ["lock"]:
            os.remove(os.path.join(cache_dir, "lock"))
            os.rmdir(cache_dir)
            os.utime(os.path.dirname(cache_dir), ns=(dataset.st_atime_ns, dataset.st_mtime_ns))
        raise
    return decode_uncached(folder, paths)


def read_cache(cache_dir, name):
    """The cache `name`, checked against its index: FileNotFoundError if it is not there, Damaged if its files
    do not match."""
    base = os.path.join(cache_dir, name)
    try:
        with np.load(base + ".index.npz") as index:
            offsets, stats, rate, crc, index_crc = (index[k] for k in ("offsets", "stats", "rate", "crc32",
                                                                       "index_crc32"))
            offsets, stats, rate, crc = offsets.astype(np.int64), stats.astype(np.float64), int(rate), int(crc)
    except FileNotFoundError:
        raise
    except Exception as e:  # numpy raises many types for a damaged archive
        raise Damaged(f"unreadable index: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}") from None
    if index_checksum(offsets, stats, rate, crc) != int(index_crc):
        raise Damaged(f"{name}.index.npz does not match its checksum (clip offsets or statistics changed)")
    with open(base + ".pcm", "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != 2 * offsets[-1]:
            raise Damaged(f"{name}.pcm holds {size:,} bytes, its index says {2 * offsets[-1]:,}")
        if crc32_of(f) != crc:
            raise Damaged(f"{name}.pcm does not match its checksum")
        pcm = np.memmap(f, dtype=np.int16, mode="r") if size else np.zeros(0, np.int16)
    return pcm, offsets, stats, rate, crc


def index_checksum(offsets, stats, rate, crc):
    """CRC-32 of everything in the index: a damaged index that still loads is caught as a damaged PCM file is."""
    parts = [np.asarray(offsets, np.int64), np.asarray(stats, np.float64), np.array([rate, crc], np.int64)]
    return zlib.crc32(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))


class Lock:
    """An exclusive lock on a file (flock: the kernel releases it when the holder dies, even by kill -9)."""

    def __init__(self, path, what):
        self.path, self.what = path, what

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish decoding {self.what} into its cache", flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def remove_leftovers(cache_dir, split):
    """Under the lock: this split's superseded caches, and every temporary file a killed builder left."""
    for f in os.listdir(cache_dir):
        if f.startswith(split + "_") or ".tmp" in f:
            os.remove(os.path.join(cache_dir, f))


def build(folder, paths, cache_dir, name):
    """Decode every usable file of the split, in order, into the cache `name`: the PCM file first, then the index
    (the index names the PCM's length and checksum, so it is written last)."""
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=cache_dir)
    try:
        os.fchmod(fd, 0o644)  # readable by every user of the dataset, as the files it derives from
        with os.fdopen(fd, "wb") as f:
            offsets, stats, rate, crc = decode(folder, paths, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(cache_dir, name + ".pcm"))
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp.npz", dir=cache_dir)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, offsets=offsets, stats=stats, rate=rate, crc32=crc,
                     index_crc32=index_checksum(offsets, stats, rate, crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(cache_dir, name + ".index.npz"))
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def decode(folder, paths, f):
    """Write the split's usable files to the open file f as 16-bit PCM, one file in memory at a time (plain
    writes, not a mapping: the pages written do not count as this process's memory) -> (offsets, stats, rate,
    crc32 of what was written)."""
    offsets, stats, rates, crc = [0], [], set(), 0
    for path in paths:
        try:
            samples, rate = read_mono(path)
        except BadAudio as e:
            warn(f"skipping {e}")
            continue
        pcm16 = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
        data = pcm16.tobytes()
        f.write(data)
        crc = zlib.crc32(data, crc)
        offsets.append(offsets[-1] + len(pcm16))
        stats.append(clip_stats(pcm16 / 32768))  # of the samples as stored
        rates.add(rate)
    if len(offsets) == 1:
        raise UserError(f"none of the {len(paths)} audio files in {folder} is usable (unreadable or non-finite)")
    if len(rates) > 1:
        raise UserError(f"files in {folder} have different sample rates {sorted(rates)}: "
                        f"run python -m lib.prepare on them first")
    return np.array(offsets, dtype=np.int64), np.array(stats, dtype=np.float64).reshape(-1, 3), rates.pop(), crc


def clip_stats(samples):
    """(mean, min, max) of a clip's float samples, in float64 (the mean as lib.quantize.normalize takes it)."""
    x = torch.from_numpy(np.asarray(samples)).double()
    return [x.mean().item(), x.min().item(), x.max().item()] if len(x) else [0.0, 0.0, 0.0]


_told = set()


def cannot_cache(folder, error):
    dataset = os.path.dirname(folder)
    if dataset not in _told:  # once per dataset, not per split
        _told.add(dataset)
        why = error.strerror or str(error)
        warn(f"cannot write a cache beside {dataset} ({why}); decoding it at every start into temporary files "
             f"that are removed when the process ends")


def decode_uncached(folder, paths):
    """The split decoded into an unnamed temporary file (nothing to clean up: the kernel frees it when the
    process ends), or into memory where no temporary file can be written either."""
    try:
        with tempfile.TemporaryFile() as f:  # O_TMPFILE: it has no name
            offsets, stats, rate, crc = decode(folder, paths, f)
            f.flush()
            pcm = np.memmap(f, dtype=np.int16, mode="r") if offsets[-1] else np.zeros(0, np.int16)
        return pcm, offsets, stats, rate, crc
    except OSError as e:
        warn(f"cannot write a temporary file either ({e.strerror or e}): decoding {folder} into memory")
    import io
    with io.BytesIO() as f:
        offsets, stats, rate, crc = decode(folder, paths, f)
        pcm = np.frombuffer(f.getvalue(), dtype=np.int16).copy()
    return pcm, offsets, stats, rate, crc


def fingerprint_id(fingerprint):
    """A fingerprint in 8 hex digits (a CRC-32 of it), to show and compare."""
    return f"{zlib.crc32(json.dumps(fingerprint, sort_keys=True).encode()):08x}"


def fingerprint(splits):
    """What identifies the data a run trains on, by content: per split, clips, samples and a CRC-32 of them."""
    return {name: {"clips": int(s.n_clips), "samples": int(s.offsets[-1]), "crc32": int(s.crc32)}
            for name, s in splits.items()}


def describe_change(old, new):
    """'' when the two fingerprints are equal, else what changed, in words."""
    said = []
    for name in new:
        a, b = old.get(name), new[name]
        if a is None:
            continue
        if (a["clips"], a["samples"]) != (b["clips"], b["samples"]):
            said.append(f"{name}: {a['clips']} clips of {a['samples']:,} samples then, {b['clips']} clips of "
                        f"{b['samples']:,} now")
        elif a["crc32"] != b["crc32"]:
            said.append(f"{name}: the same length, different samples")
    return "; ".join(said)
