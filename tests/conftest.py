"""Shared fixtures: real recorded speech from the repository's dataset, cut into small files."""
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads it: tests run one process per core
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
torch.set_num_threads(1)  # on 2 cores, one thread per process made small loops several times faster

from lib import DEFAULT_DATA  # noqa: E402

RATE = 8000


def speech(seconds, clip=0, offset=0.0):
    """float32 real speech from the default dataset's train clips, as a numpy array."""
    audio, rate = sf.read(os.path.join(DEFAULT_DATA, "train", f"{clip:05d}.flac"), dtype="float32")
    assert rate == RATE
    start = int(offset * rate)
    return audio[start:start + int(seconds * rate)]


def loudest_second():
    """The loudest second of a train clip of real speech."""
    audio = speech(8.0)
    energy = np.convolve(audio ** 2, np.ones(RATE), mode="valid")
    start = int(np.argmax(energy[::800]) * 800)
    return audio[start:start + RATE]


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """1 s of real speech (the loudest second of a train clip) as a 16-bit WAV file."""
    path = str(tmp_path_factory.mktemp("speech") / "speech.wav")
    sf.write(path, loudest_second(), RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def half_second_wav(tmp_path_factory):
    """The first half of speech_wav: what the overfitting tests memorize (half the steps of a second)."""
    path = str(tmp_path_factory.mktemp("speech") / "half_second.wav")
    sf.write(path, loudest_second()[:RATE // 2], RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def quarter_second_wav(tmp_path_factory):
    """The first quarter of speech_wav: what the slowest overfitting test (the baseline on reals) memorizes."""
    path = str(tmp_path_factory.mktemp("speech") / "quarter_second.wav")
    sf.write(path, loudest_second()[:RATE // 4], RATE, subtype="PCM_16")
    return path


def run_main(main, argv, capsys=None):
    """Call a script's main(argv) in-process -> exit status."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0
