"""Reading and writing audio files with soundfile; finding audio in folders."""
import os
import sys

import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def find_audio(folder):
    """All audio files under `folder`, recursively, sorted by path (so every listing is reproducible)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip caches such as .cache/
        found += [os.path.join(root, f) for f in files if f.lower().endswith(AUDIO_EXTENSIONS)]
    return sorted(found)


def read_mono(path):
    """(float32 samples in [-1, 1], sample rate), channels averaged; None (with a warning) if unreadable."""
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for broken or foreign files
        warn(f"skipping {path}: not readable as audio ({str(e).splitlines()[0]})")
        return None, None
    return audio.mean(axis=1, dtype=np.float32), rate


def write_wav(path, samples, rate):
    """Float audio in [-1, 1] -> 16-bit WAV, written to a temporary name and renamed."""
    tmp = path + ".tmp.wav"
    sf.write(tmp, np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16")
    os.replace(tmp, path)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)
