"""--tensorboard: a run's intervals as TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir runs`).

At every interval's end: the metrics row's numbers as scalars by iteration (NLLs in bits per sample, grad norm,
samples/s, learning rate, epochs, and the training hours, so that runs of other speeds compare at equal time),
the interval's samples as audio at the run's rate, decoded as the run's quantization (the WAVs the run wrote), and
their spectrograms as images; the flags once, as text. A resumed run purges what came after its checkpoint
(SummaryWriter's purge_step) and logs every interval up to it again from the run's record (metrics.jsonl and the
samples), so no interval appears twice and none trained without the flag is missing. Only the
process that writes the run folder (rank 0) writes here. Imported only with the flag: a run without it never
imports tensorboard."""
import os

import numpy as np

from lib import UserError
from lib.audio import read_mono
from lib.page import spectrogram_path

SCALARS = {"train_bits": "nll/train_bits", "valid_bits": "nll/valid_bits", "test_bits": "nll/test_bits",
           "best_test_bits": "nll/best_test_bits", "grad_norm": "train/grad_norm",
           "samples_per_sec": "train/samples_per_sec", "epochs": "train/epochs"}


NO_TENSORBOARD = ("--tensorboard needs the tensorboard package: pip install tensorboard, or train without it "
                  "(--no_tensorboard turns off what a resumed run was made with)")


def check_installed():
    """A UserError now, before a run folder is made or a run resumed, when tensorboard cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(NO_TENSORBOARD) from None


class Board:
    """The run's event files. purge: the first step whose events are redone and so dropped (None for a new run;
    1 for a resumed one, which lib.session writes anew from the run's record); with_flags: write the flags' text."""

    def __init__(self, run, flags, purge, with_flags=True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(NO_TENSORBOARD) from None
        self.writer = SummaryWriter(run.tensorboard, purge_step=purge)
        if with_flags:  # at step 0, which no purge drops: once per run
            self.writer.add_text("flags", "\n".join(f"    --{k} {v}" for k, v in sorted(flags.items())), 0)
            self.writer.flush()

    def interval(self, row, lr, sample_paths, sample_rate):
        """One interval's end: its row's numbers, and the samples in `sample_paths` (those that exist)."""
        it = row["iteration"]
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], it)
        self.writer.add_scalar("train/lr", lr, it)
        self.writer.add_scalar("time/train_hours", row["train_secs"] / 3600, it)
        for k, wav in enumerate(sample_paths):
            if not os.path.exists(wav):
                continue
            audio, rate = read_mono(wav)
            self.writer.add_audio(f"samples/{k}", audio[None], it, sample_rate=rate)
            if os.path.exists(spectrogram_path(wav)):
                from matplotlib.image import imread
                self.writer.add_image(f"spectrograms/{k}", np.asarray(imread(spectrogram_path(wav))), it,
                                      dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
