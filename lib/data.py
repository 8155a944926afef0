"""Datasets on disk, read memory-mapped and walked in truncated-BPTT chunks.

A dataset is either a folder made by `python -m lib.prepare` (train/, valid/, test/ of audio clips) or one
audio file (the "overfit one recording" experiment: it is cut into clips and serves as every split).

Each split of a folder is decoded once into `<dataset>/.cache/` (lib/cache.py: keyed on what changes when a
file does, built by one process at a time, checked at every start): all its clips end to end as one file of
16-bit PCM (2 bytes a sample), opened memory-mapped, and a small index. Batches are read from it and quantized per step, so memory does not grow with the
dataset: 24 hours at 16 kHz are 2.8 GB on disk and a few MB in memory. Prepared clips are 16-bit, so this
loses nothing; a float source is rounded to 16 bits, far finer than the 256 levels trained on.

Chunking: the clips are walked in segments of equal length, `chunks_per_segment` whole chunks of seq_len
samples: a clip is one segment when all clips have the same length (what lib.prepare makes); otherwise the
segment is the shortest clip's whole chunks, and each clip holds as many segments as fit in it. Each segment
is prefixed with `overlap` samples of q_zero and walked in chunks of `overlap + seq_len` samples with stride
`seq_len`, so a chunk's first `overlap` samples are the previous chunk's last ones. Inputs are
chunk[:, :-overlap], targets chunk[:, overlap:]. The first chunk of each segment carries reset=True: the
model starts it from its learned h0. A segment that starts inside a clip (a clip holding several) is prefixed
with q_zero too, not with the clip's samples before it: every chunk that starts from h0 then starts as sampling
does (q_zero and h0), and as the clip's first segment did.
"""
import os
import zlib

import numpy as np
import torch

from lib import UserError, cache, warn
from lib.audio import find_audio, read_mono
from lib.cache import clip_stats
from lib.prepare import SPLITS, cut_clips
from lib.quantize import quantize, q_zero, stretch

PCM_SCALE = 1 / 32768  # 16-bit PCM -> float in [-1, 1)


class Split:
    """The clips of one split: `pcm` (1-D: int16 PCM, memory-mapped, or any array in memory), clip i being
    pcm[offsets[i]:offsets[i + 1]]; `stats` (n_clips, 3) each clip's mean, min and max as floats.
    levels(clips, starts, length) reads and quantizes windows of clips, q_zero before a clip's start."""

    def __init__(self, pcm, offsets, stats, rate, scale=PCM_SCALE):
        self.pcm, self.offsets, self.stats, self.rate, self.scale = pcm, np.asarray(offsets), stats, rate, scale
        self.lengths = np.diff(self.offsets)
        self.quantizer = None  # (q_levels, qtype, zero_dc, norm), set by set_quantization()
        self.crc32 = None  # of the samples (lib.cache.fingerprint), where known

    @classmethod
    def of_levels(cls, levels):
        """A split whose samples are already levels (a (n_clips, clip_len) int tensor): tests, the one-file case."""
        n, length = levels.shape
        return cls(levels.reshape(-1).numpy(), np.arange(n + 1) * length, None, None, scale=None)

    @property
    def n_clips(self):
        return len(self.lengths)

    def set_quantization(self, q_levels, qtype, zero_dc=False, norm="none"):
        """How levels() quantizes this split's clips from now on."""
        self.quantizer = (q_levels, qtype, zero_dc, norm)

    def is_silent(self):
        return not np.any(self.stats[:, 1:]) if self.stats is not None else not np.any(self.pcm)

    def on_device(self, device, q_levels):
        """This split quantized once into a torch tensor on `device` (uint8 for q_levels <= 256: 1 byte a
        sample), so that batches are gathered there; the levels equal those quantized per batch."""
        dtype = torch.uint8 if q_levels <= 256 else torch.int32
        out = torch.empty(int(self.offsets[-1]), dtype=dtype, device=device)
        for clip in range(self.n_clips):  # one clip at a time: host memory stays flat
            a, b = self.offsets[clip], self.offsets[clip + 1]
            out[a:b] = self.levels([clip], [0], b - a, q_levels)[0].to(device, dtype)
        held = Split(out, self.offsets, self.stats, self.rate, scale=None)
        held.crc32 = self.crc32
        return held

    def levels(self, clips, starts, length, q_levels):
        """int64 (len(clips), length): samples starts[i] .. starts[i] + length - 1 of clip clips[i], as levels;
        positions before the clip's start (negative) are q_zero."""
        if isinstance(self.pcm, torch.Tensor):  # levels held on a device: gather there, without waiting for it
            dev = self.pcm.device
            rows = torch.from_numpy(np.stack([self.offsets[np.asarray(clips)], np.asarray(starts)]).astype(np.int64))
            if dev.type == "cuda":  # a copy from pinned memory does not wait for the GPU's queued steps
                rows = rows.pin_memory()
            first, start = rows.to(dev, non_blocking=True)
            pos = start[:, None] + torch.arange(length, device=dev)
            out = self.pcm[first[:, None] + pos.clamp(min=0)].long()
            return torch.where(pos < 0, q_zero(q_levels), out)  # a mask assignment would wait for the GPU
        clips, starts = np.asarray(clips), np.asarray(starts)
        idx = self.offsets[clips][:, None] + starts[:, None] + np.arange(length)  # (B, length) into pcm
        before = starts[:, None] + np.arange(length) < 0
        raw = torch.from_numpy(np.asarray(self.pcm[np.where(before, 0, idx)]))
        if self.scale is None:  # already levels
            out = raw.long()
        else:
            out = quantize(self.normalize(raw.double() * self.scale, clips), *self.quantizer[:2])
        out[torch.from_numpy(before)] = q_zero(q_levels)
        return out

    def normalize(self, x, clips):
        """The per-clip options (lib.quantize.normalize) from the clips' stored statistics."""
        _, _, zero_dc, norm = self.quantizer
        mean, lo, hi = (torch.from_numpy(self.stats[clips, k])[:, None] for k in range(3))
        if zero_dc:
            x, lo, hi = x - mean, lo - mean, hi - mean
        return stretch(x, lo, hi) if norm == "minmax" else x


def _open_split(folder):
    """The split in `folder`, through its checked cache (lib/cache.py)."""
    paths, _ = find_audio(folder)
    if not paths:
        raise UserError(f"no audio files in {folder}")
    pcm, offsets, stats, rate, crc = cache.open_cached(folder, paths)
    split = Split(pcm, offsets, stats, rate)
    split.crc32 = crc
    return split


def load_splits(path, clip_secs=8.0):
    """{'train', 'valid', 'test': Split}, sample_rate. See the module docstring."""
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist: give a folder made by python -m lib.prepare, "
                        f"or one audio file")
    if os.path.isfile(path):
        audio, rate = read_mono(path)  # BadAudio names the file
        if not np.any(audio):
            raise UserError(f"--data {path} is silent: every sample is zero")
        clip_len = min(len(audio), int(round(clip_secs * rate)))
        clips = cut_clips(audio, clip_len)
        split = Split(clips.reshape(-1), np.arange(len(clips) + 1) * clip_len, np.array([clip_stats(c) for c in clips]),
                      rate, scale=1.0)
        split.crc32 = zlib.crc32(np.ascontiguousarray(clips).tobytes())
        return {name: split for name in SPLITS}, rate
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"--data {path} is not a prepared dataset (no {'/, '.join(missing)}/ folder): "
                        f"run python -m lib.prepare {path} NEW_FOLDER first, or give one audio file")
    splits = {name: _open_split(os.path.join(path, name)) for name in SPLITS}
    rates = {s.rate for s in splits.values()}
    if len(rates) > 1:
        raise UserError(f"the splits of {path} have different sample rates {sorted(rates)}")
    if splits["train"].is_silent():
        raise UserError(f"the train split of {path} is silent: every sample is zero")
    return splits, rates.pop()


class Segments:
    """A split's clips as segments of equal length (whole chunks of seq_len; see the module docstring)."""

    def __init__(self, split, seq_len, what="clips"):
        if not isinstance(split, Split):
            split = Split.of_levels(split)
        self.split, self.seq_len = split, seq_len
        usable = split.lengths >= seq_len
        if not usable.any():
            raise UserError(f"{what} are at most {split.lengths.max()} samples, shorter than one training chunk of "
                            f"{seq_len} samples: use fewer --n_frames / a shorter --seq_len, or longer clips")
        self.chunks = int(split.lengths[usable].min()) // seq_len  # chunks per segment
        self.length = self.chunks * seq_len
        per_clip = np.where(usable, split.lengths // self.length, 0)
        self.clip = np.repeat(np.arange(split.n_clips), per_clip)  # segment -> its clip
        self.start = np.concatenate([np.arange(k) * self.length for k in per_clip]).astype(np.int64)
        unused = 1 - self.length * len(self.clip) / split.lengths.sum()
        if (split.lengths != split.lengths[0]).any() and what == "train clips":
            warn(f"{what} differ in length: they are walked in segments of {self.length} samples (the shortest's "
                 f"whole chunks), {len(self.clip)} in all; {unused:.1%} of the samples, in the clips' tails, and "
                 f"{(~usable).sum()} clips shorter than one chunk are not trained on")

    def __len__(self):
        return len(self.clip)

    def levels(self, rows, start, length, q_levels):
        """int64 (len(rows), length): samples start .. start + length - 1 of the segments `rows`."""
        rows = np.asarray(rows)
        out = self.split.levels(self.clip[rows], self.start[rows] + start, length, q_levels)
        if start < 0:  # before the segment, q_zero: also where it starts inside a clip (module docstring: why)
            out[:, :min(-start, length)] = q_zero(q_levels)
        return out


class ChunkBatches:
    """The training batches as a pure function of the iteration number, so resuming needs no data state.

    Iteration i walks chunk i % chunks_per_clip of a batch of segments (clips). The batches of one epoch are a
    seeded permutation of the segments; with fewer segments than batch_size, they are drawn with replacement.
    Under torchrun (lib/dist.py) the batch is the global one, world * batch_size, and rank r takes its r-th part.
    """

    def __init__(self, split, batch_size, seq_len, overlap, q_levels, seed, rank=0, world=1):
        self.segments = Segments(split, seq_len, "train clips")
        self.chunks_per_clip = self.segments.chunks  # the tail beyond a whole chunk is not trained on
        self.seq_len, self.overlap, self.q_levels, self.seed = seq_len, overlap, q_levels, seed
        self.batch_size = batch_size * world  # the global batch
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)  # this rank's part of it
        self.with_replacement = len(self.segments) < self.batch_size
        self.batches_per_epoch = 1 if self.with_replacement else len(self.segments) // self.batch_size
        self._perm_epoch, self._perm = None, None

    def clip_indices(self, group):
        """Segment indices of the `group`-th batch of segments."""
        n = len(self.segments)
        if self.with_replacement:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + group)
            return torch.randint(n, (self.batch_size,), generator=g)
        epoch, b = divmod(group, self.batches_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            self._perm_epoch = epoch
        return self._perm[b * self.batch_size:(b + 1) * self.batch_size]

    def __call__(self, iteration):
        """(chunk (B, overlap + seq_len) int64, reset) for training iteration `iteration` (0-based)."""
        group, k = divmod(iteration, self.chunks_per_clip)
        rows = self.clip_indices(group).numpy()[self.rows]
        return self.segments.levels(rows, k * self.seq_len - self.overlap, self.overlap + self.seq_len,
                                    self.q_levels), k == 0


def eval_chunks(split, batch_size, seq_len, overlap, q_levels, eval_len, max_clips=0):
    """Every whole training chunk of every segment (of the first max_clips, if > 0), in a fixed order, walked in
    longer chunks of up to `eval_len` samples (a multiple of seq_len): yields (chunk, reset) for batches of up
    to batch_size segments."""
    segments = Segments(split, seq_len, "valid and test clips")
    n = min(len(segments), max_clips) if max_clips else len(segments)
    covered = segments.length  # exactly the samples that training predicts
    for first in range(0, n, batch_size):
        padded = segments.levels(np.arange(first, min(n, first + batch_size)), -overlap, overlap + covered, q_levels)
        for start in range(0, covered, eval_len):
            yield padded[:, start:start + overlap + min(eval_len, covered - start)], start == 0


def hold_on_device(splits, device, q_levels):
    """The splits as levels on the device, each distinct split once (one file's data serves as all three)."""
    held = {id(s): s.on_device(device, q_levels) for s in splits.values()}
    return {name: held[id(s)] for name, s in splits.items()}
