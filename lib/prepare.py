"""Turn any folder of audio into a dataset: python -m lib.prepare SRC OUT [--sample_rate 8000] [--clip_secs 8]

Every WAV/FLAC/OGG file under SRC (recursively; any rate, any channel count) is read, mixed to mono and
resampled with soxr to --sample_rate. Other files, unreadable ones, files with NaN or infinite samples and
silent ones (peak below --silence_db) are skipped with a warning and listed in dataset.json. Files are
split into train/valid/test by a seeded shuffle of the sorted file list (so no recording is in two splits);
each split is concatenated in that order and cut into clips of --clip_secs with stride = clip length (no
sample is in two clips; only the final partial clip of each split is dropped). Clips are written as 16-bit
FLAC to OUT/{train,valid,test}/, with OUT/dataset.json recording the settings, the split and the counts.
They are written into OUT.partial/, renamed to OUT at the end, so an interrupted run leaves no OUT behind.
"""
import json
import os
import random
import shutil

if __name__ == "__main__":  # before the slow imports: Ctrl-C while they load or while reading is one line
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted; nothing was written (a rerun starts over)")

import numpy as np
import soxr
from tqdm import tqdm

from lib import UserError, WriteError, warn
from lib.cli import ArgumentParser, run_script
from lib.audio import AUDIO_EXTENSIONS, BadAudio, find_audio, read_mono, write_pcm16

SPLITS = ("train", "valid", "test")


def split_files(files, fractions, seed):
    """Seeded shuffle of the sorted list, then cut by fractions; a pure function of (files, fractions, seed)."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(fractions[1] * len(order)))
    n_test = max(1, round(fractions[2] * len(order)))
    n_train = len(order) - n_valid - n_test
    if n_train < 1:
        raise UserError(f"only {len(order)} usable audio files: a train/valid/test split needs at least 3 "
                        f"(to train on one recording, pass the file itself as --data)")
    return {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}


def cut_clips(audio, clip_len):
    """(n_clips, clip_len) view of consecutive, non-overlapping clips; the final partial clip is dropped."""
    n_clips = len(audio) // clip_len
    return audio[:n_clips * clip_len].reshape(n_clips, clip_len)


def prepare(src, out, sample_rate=8000, clip_secs=8.0, fractions=(0.9, 0.05, 0.05), seed=0, silence_db=-60.0):
    if not os.path.isdir(src):
        raise UserError(f"source folder {src} does not exist (or is not a folder)")
    inside = os.path.commonpath([os.path.realpath(src), os.path.realpath(out)]) == os.path.realpath(src)
    if inside:  # its clips (and OUT.partial's) would be taken in as sources by a later prepare of SRC
        raise UserError(f"output {out} is inside the source folder {src}: choose a folder outside it")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"output {out} already exists and is not empty: choose a new folder (nothing was changed)")
    if not (sample_rate >= 1 and 0 < clip_secs < float("inf")):
        raise UserError("--sample_rate and --clip_secs must be positive")
    if len(fractions) != 3 or not min(fractions) >= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"--split {fractions} must be three non-negative fractions that sum to 1")
    paths, other = find_audio(src)
    skipped = {os.path.relpath(p, src): "extension" for p in other}
    if other:
        names = ", ".join(skipped)
        warn(f"skipping {len(other)} files that are not {' '.join(AUDIO_EXTENSIONS)} (convert them first, e.g. "
             f"with ffmpeg): {names[:300]}{' ...' if len(names) > 300 else ''}")
    if not paths:
        raise UserError(f"no audio files ({' '.join(AUDIO_EXTENSIONS)}) found under {src}")

    # everything is written into OUT.partial and renamed at the end: a crash or Ctrl-C leaves no half-made OUT
    # that a rerun would refuse (a rerun removes a stale OUT.partial). Memory stays flat in the corpus length: each
    # usable file is decoded once into OUT.partial/.decoded/ (float32), then each split is cut into clips from
    # there, one file in memory at a time.
    partial = os.path.abspath(out).rstrip(os.sep) + ".partial"  # beside OUT, also when OUT is '.'
    shutil.rmtree(partial, ignore_errors=True)
    try:
        meta = write_dataset(src, paths, skipped, partial, sample_rate, clip_secs, fractions, seed, silence_db)
        if os.path.isdir(out):  # empty (checked above), and maybe a shell's current folder: filled, not replaced
            for name in sorted(os.listdir(partial), key=lambda n: n == "dataset.json"):  # the index last
                os.replace(os.path.join(partial, name), os.path.join(out, name))
            os.rmdir(partial)
        else:
            os.replace(partial, out)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(out, e) from None
        raise

    print(f"dataset {out}: {sample_rate} Hz mono, clips of {clip_secs:g} s ({meta['clip_len']} samples), "
          f"{meta['used']} files used, {len(skipped)} skipped")
    for name in SPLITS:
        s = meta["splits"][name]
        print(f"  {name:5s}  {len(s['files']):4d} files  {s['clips']:5d} clips  {s['minutes']:7.2f} min")
        if s["clips"] == 0:
            warn(f"split {name} has no full clip of {clip_secs:g} s: use shorter --clip_secs or more audio")
        elif len(s["files"]) == 1 and name != "train":
            warn(f"split {name} comes from a single source file ({s['files'][0]}): its NLL describes one "
                 f"recording; more files (or a larger --split fraction) make it a fairer estimate")
    return meta


def write_dataset(src, paths, skipped, folder, sample_rate, clip_secs, fractions, seed, silence_db):
    """The dataset into `folder` -> its metadata (as dataset.json holds it, and 'used': the files used)."""
    decoded_dir = os.path.join(folder, ".decoded")
    os.makedirs(decoded_dir)
    decoded = {}  # relative path -> its samples at sample_rate, as float32 on disk
    for i, path in enumerate(tqdm(paths, desc="reading", unit="file", disable=None)):
        rel = os.path.relpath(path, src)
        try:
            samples, rate = read_mono(path)
        except BadAudio as e:
            warn(f"skipping {e}")
            skipped[rel] = "unreadable" if "not readable" in str(e) else "non-finite"
            continue
        if rate != sample_rate:
            samples = soxr.resample(samples, rate, sample_rate, quality="HQ").astype(np.float32)
        if len(samples) == 0 or np.abs(samples).max() < 10 ** (silence_db / 20):
            warn(f"skipping {path}: empty or silent (peak below {silence_db:g} dBFS)")
            skipped[rel] = "silent"
            continue
        decoded[rel] = os.path.join(decoded_dir, f"{i:07d}.f32")
        np.asarray(samples, dtype=np.float32).tofile(decoded[rel])
    if not decoded:
        raise UserError(f"none of the {len(paths)} audio files under {src} could be used (unreadable or silent)")

    clip_len = int(round(clip_secs * sample_rate))
    splits = split_files(list(decoded), fractions, seed)
    meta = {"source": src, "silence_db": silence_db, "sample_rate": sample_rate, "clip_secs": clip_secs,
            "clip_len": clip_len, "split_fractions": list(fractions), "seed": seed, "skipped": skipped, "splits": {}}
    for name in SPLITS:
        os.makedirs(os.path.join(folder, name))
        clips, carry, total = 0, np.zeros(0, np.float32), 0
        for rel in splits[name]:  # the split's files end to end, cut into clips as they come
            joined = np.concatenate([carry, np.fromfile(decoded[rel], dtype=np.float32)])
            total += len(joined) - len(carry)
            whole = cut_clips(joined, clip_len)
            for clip in whole:
                # clip to the 16-bit range: resampling can overshoot full scale slightly
                write_pcm16(os.path.join(folder, name, f"{clips:05d}.flac"), np.clip(clip, -1.0, 32767 / 32768),
                            sample_rate)
                clips += 1
            carry = joined[len(whole) * clip_len:].copy()
        meta["splits"][name] = {"files": splits[name], "source_samples": total, "clips": clips,
                                "minutes": clips * clip_len / sample_rate / 60}
    shutil.rmtree(decoded_dir)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return dict(meta, used=len(decoded))


def build_parser():
    p = ArgumentParser(prog="python -m lib.prepare", description=__doc__)
    p.add_argument("src", help="folder of audio files (searched recursively)")
    p.add_argument("out", help="new folder for the dataset (must not exist or be empty)")
    p.add_argument("--sample_rate", type=int, default=8000, help="output sample rate (Hz)")
    p.add_argument("--clip_secs", type=float, default=8.0, help="clip length (seconds)")
    p.add_argument("--split", type=float, nargs=3, default=[0.9, 0.05, 0.05], metavar=("TRAIN", "VALID", "TEST"),
                   help="fractions of the files in each split")
    p.add_argument("--seed", type=int, default=0, help="seed of the file shuffle that makes the split")
    p.add_argument("--silence_db", type=float, default=-60.0,
                   help="skip files whose peak is below this level (dB relative to full scale)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_script(prepare, args.src, args.out, args.sample_rate, args.clip_secs, tuple(args.split), args.seed,
               args.silence_db)


if __name__ == "__main__":
    main()
