"""What the scripts share, one concern a module:

  models       layers.py (GRUs, weight norm), quantize.py, sample.py (the reference sampler; kernels.py and
               teams.py its compiled fast step)
  data         audio.py (reading, writing), prepare.py and download.py (datasets), cache.py, data.py (batches)
  training     train.py (the entry, the loop, an interval's end), settings.py (flags and their roles),
               session.py (one session set up), step.py (the step, evaluation, non-finite values), run.py (Run,
               the run folder as one object: its paths, its record, its metrics, its lock, what may be written
               over) and beneath it checkpoint.py (save, read, resume), terminal.py (the progress a person sees,
               the signals that stop a run), dist.py (torchrun), cuda_graph.py
  command line cli.py (the parser, one-line errors, a quiet Ctrl-C, the torch version check)
  reading      report.py (python -m lib.report), windows.py (its windows of train NLL), seeds.py (--by_seed),
               page.py (pages to listen with), plots.py, board.py (--tensorboard)

and here what every module uses: the model registry (each model file registers itself), one-line errors and
warnings.
Nothing in lib imports a script; a model script imports only the models' modules."""
import os
import sys


MODELS = {"twotier": "two_tier", "threetier": "three_tier", "baseline": "baseline"}  # model id -> its script
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "asterisk_en")


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file). Scripts print it as one line and exit with status 2."""


class WriteError(Exception):
    """A file could not be written (disk full, read-only, not a folder): one line, exit status 1."""

    def __init__(self, path, error):
        super().__init__(f"cannot write {path}: {error.strerror or error}")


class Interrupted(Exception):
    """A long computation (evaluation, sampling) stopped early because a signal asked the run to stop.
    saved: whether the interval's checkpoint had been written before."""

    def __init__(self, saved=False):
        super().__init__("interrupted")
        self.saved = saved


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)
