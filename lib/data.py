"""Loading a dataset into memory and walking it in truncated-BPTT chunks.

A dataset is either a folder made by `python -m lib.prepare` (train/, valid/, test/ of equal-length clips)
or one audio file (the "overfit one recording" experiment: it is cut into clips and serves as every split).
Decoded audio is cached as .npy in `<dataset>/.cache/` so a restart does not decode again.

Chunking: each clip is prefixed with `overlap` samples of q_zero and walked in chunks of
`overlap + seq_len` samples with stride `seq_len`, so a chunk's first `overlap` samples are the previous
chunk's last ones. Inputs are chunk[:, :-overlap], targets chunk[:, overlap:]. The first chunk of each
clip carries reset=True: the model starts it from its learned h0.
"""
import hashlib
import json
import os

import numpy as np
import torch

from lib import UserError, WriteError, atomic_write
from lib.audio import BadAudio, find_audio, read_mono, warn
from lib.prepare import SPLITS, cut_clips
from lib.quantize import normalize, q_zero, quantize

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "asterisk_en")


def _read_files(paths):
    """Decode files -> list of float32 arrays (unusable ones skipped with a warning) and their one rate."""
    arrays, rates = [], set()
    for path in paths:
        try:
            samples, rate = read_mono(path)
        except BadAudio as e:
            warn(f"skipping {e}")
            continue
        arrays.append(samples)
        rates.add(rate)
    if len(rates) > 1:
        raise UserError(f"files in {os.path.dirname(paths[0])} have different sample rates {sorted(rates)}: "
                        f"run python -m lib.prepare on them first")
    return arrays, rates.pop() if rates else None


def _load_split(folder):
    """(n_clips, clip_len) float32 array and rate of one split, through the .npy cache."""
    paths, _ = find_audio(folder)
    if not paths:
        raise UserError(f"no audio files in {folder}")
    stats = [(os.path.relpath(p, folder), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.dirname(folder), ".cache", f"{os.path.basename(folder)}_{key}.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            return f["clips"], int(f["rate"])
    arrays, rate = _read_files(paths)
    if not arrays:
        raise UserError(f"none of the {len(paths)} audio files in {folder} is usable (unreadable or non-finite)")
    clip_len = min(len(a) for a in arrays)
    if any(len(a) != clip_len for a in arrays):
        warn(f"clips in {folder} differ in length: all are cut to the shortest, {clip_len} samples")
    clips = np.stack([a[:clip_len] for a in arrays])
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_write(cache, lambda tmp: np.savez(tmp, clips=clips, rate=rate))
    except (OSError, WriteError):
        pass  # a read-only dataset still loads; it is decoded again next time
    return clips, rate


def load_audio(path, clip_secs=8.0):
    """{'train', 'valid', 'test': (n_clips, clip_len) float32}, sample_rate. See the module docstring."""
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist: give a folder made by python -m lib.prepare, "
                        f"or one audio file")
    if os.path.isfile(path):
        audio, rate = read_mono(path)  # BadAudio names the file
        if not np.any(audio):
            raise UserError(f"--data {path} is silent: every sample is zero")
        clip_len = min(len(audio), int(round(clip_secs * rate)))
        clips = cut_clips(audio, clip_len)
        return {name: clips for name in SPLITS}, rate
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"--data {path} is not a prepared dataset (no {'/, '.join(missing)}/ folder): "
                        f"run python -m lib.prepare {path} NEW_FOLDER first, or give one audio file")
    splits, rates = {}, set()
    for name in SPLITS:
        splits[name], rate = _load_split(os.path.join(path, name))
        rates.add(rate)
    if len(rates) > 1:
        raise UserError(f"the splits of {path} have different sample rates {sorted(rates)}")
    if not np.any(splits["train"]):
        raise UserError(f"the train split of {path} is silent: every sample is zero")
    return splits, rates.pop()


def quantize_clips(clips, q_levels, qtype, zero_dc=False, norm="none"):
    """float (n, T) numpy -> int64 levels tensor (n, T), with the per-clip options."""
    return quantize(normalize(torch.from_numpy(clips), zero_dc, norm), q_levels, qtype)


class ChunkBatches:
    """The training batches as a pure function of the iteration number, so resuming needs no data state.

    Iteration i walks chunk i % chunks_per_clip of a batch of clips. The batches of one epoch are a
    seeded permutation of the clips; with fewer clips than batch_size, clips are drawn with replacement.
    """

    def __init__(self, levels, batch_size, seq_len, overlap, q_levels, seed):
        n_clips, clip_len = levels.shape
        if clip_len < seq_len:
            raise UserError(f"clips are {clip_len} samples, shorter than one training chunk of {seq_len} samples: "
                            f"use fewer --n_frames / a shorter --seq_len, or longer clips")
        self.chunks_per_clip = clip_len // seq_len  # the tail beyond a whole chunk is not trained on
        pad = torch.full((n_clips, overlap), q_zero(q_levels), dtype=levels.dtype)
        self.padded = torch.cat([pad, levels[:, :self.chunks_per_clip * seq_len]], dim=1)
        self.batch_size, self.seq_len, self.overlap, self.seed = batch_size, seq_len, overlap, seed
        self.with_replacement = n_clips < batch_size
        self.batches_per_epoch = 1 if self.with_replacement else n_clips // batch_size
        self._perm_epoch, self._perm = None, None

    def clip_indices(self, group):
        """Clip indices of the `group`-th batch of clips."""
        n_clips = self.padded.shape[0]
        if self.with_replacement:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + group)
            return torch.randint(n_clips, (self.batch_size,), generator=g)
        epoch, b = divmod(group, self.batches_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(n_clips, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            self._perm_epoch = epoch
        return self._perm[b * self.batch_size:(b + 1) * self.batch_size]

    def __call__(self, iteration):
        """(chunk (B, overlap + seq_len) int64, reset) for training iteration `iteration` (0-based)."""
        group, k = divmod(iteration, self.chunks_per_clip)
        start = k * self.seq_len
        # slice the chunk's columns first, so only (B, overlap + seq_len) samples are copied
        return self.padded[:, start:start + self.overlap + self.seq_len][self.clip_indices(group)], k == 0


def eval_chunks(levels, batch_size, seq_len, overlap, q_levels, eval_len):
    """Every whole training chunk of every clip, in a fixed order, walked in longer chunks of up to
    `eval_len` samples (a multiple of seq_len): yields (chunk, reset) for batches of up to batch_size clips."""
    covered = levels.shape[1] // seq_len * seq_len  # exactly the samples that training predicts
    for first in range(0, levels.shape[0], batch_size):
        rows = levels[first:first + batch_size, :covered]
        padded = torch.cat([torch.full((rows.shape[0], overlap), q_zero(q_levels), dtype=rows.dtype), rows], dim=1)
        for start in range(0, covered, eval_len):
            yield padded[:, start:start + overlap + min(eval_len, covered - start)], start == 0
