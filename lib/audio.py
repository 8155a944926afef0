"""Reading and writing audio files with soundfile; finding audio in folders."""
import errno
import os

import numpy as np
import soundfile as sf

from lib import UserError, warn
from lib.run import atomic_write

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class BadAudio(UserError):
    """A file that cannot be used as audio: unreadable, or holding NaN or infinite samples."""


def find_audio(folder):
    """(audio files under `folder`, other files under it), recursively, each sorted by path (so every listing is
    reproducible). Hidden folders such as .cache/ and hidden files are not searched. Linked folders are followed,
    each real folder once (so a link back up the tree makes no loop)."""
    found, other, seen = [], [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith("."):
                (found if f.lower().endswith(AUDIO_EXTENSIONS) else other).append(os.path.join(root, f))
    return sorted(found), sorted(other)


def read_mono(path):
    """(float32 samples, sample rate), channels averaged. BadAudio if the file is unreadable or holds non-finite
    samples (a float WAV can hold NaN; quantizing it would make nonsense levels)."""
    try:  # as bytes: a name that is not valid UTF-8 reaches libsndfile as it is on disk
        audio, rate = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for broken or foreign files
        raise BadAudio(f"{path} is not readable as audio ({str(e).splitlines()[0]})") from None
    bad = np.count_nonzero(~np.isfinite(audio))
    if bad:
        raise BadAudio(f"{path} holds {bad} non-finite samples (NaN or infinity): repair or remove the file")
    mono = audio.mean(axis=1, dtype=np.float32)
    say_what_is_lost(path, audio, mono)
    return mono, rate


def say_what_is_lost(path, audio, mono):
    """One line each for what using the file loses without a word: samples beyond +-1, which every use clips (a
    float file can hold them), and channels that cancel when averaged to mono (left = -right mixes to silence)."""
    over = np.count_nonzero(np.abs(mono) > 1.0)
    peak = float(np.abs(mono).max()) if over else 0.0
    if over and (over >= 1e-4 * len(mono) or peak >= 1.05):  # not a lossy decoder's few overshoots of a loud file
        warn(f"{path}: {over / len(mono):.2%} of its samples lie beyond +-1 (peak {peak:.2f}) and are clipped to "
             f"+-1: scale the file to peak below 1 (by {1 / peak:.2f}) to keep them")
    if audio.shape[1] > 1 and len(mono):
        channels, mixed = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), float(np.sqrt(np.mean(
            mono.astype(np.float64) ** 2)))
        if channels > 1e-4 and mixed < 0.1 * channels:  # 20 dB quieter than its channels: they cancel
            warn(f"{path}: its {audio.shape[1]} channels cancel when averaged to mono (the mix is "
                 f"{-20 * np.log10(max(mixed, 1e-12) / channels):.0f} dB below them; out of phase?): use one "
                 f"channel of it instead")


def write_wav(path, samples, rate):
    """Float audio in [-1, 1] -> 16-bit WAV, written to a temporary name and renamed (lib.run.atomic_write)."""
    atomic_write(path, lambda tmp: write_pcm16(tmp, np.clip(samples, -1.0, 1.0), rate))


def write_pcm16(path, samples, rate):
    """16-bit audio in the format the extension names. libsndfile's errors (a full disk, a read-only folder: 'System
    error.') are OSErrors here, so that callers report them as the failed writes they are (lib.WriteError)."""
    try:
        sf.write(path, samples, rate, subtype="PCM_16")
    except sf.SoundFileError as e:
        raise OSError(errno.EIO, f"{str(e).splitlines()[0]} (libsndfile: a full disk or a folder not writable?)") \
            from None

