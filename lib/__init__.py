"""What the scripts share, one concern a module:

  models       layers.py (GRUs, weight norm), quantize.py, sample.py (the reference sampler; kernels.py and
               teams.py its compiled fast step)
  data         audio.py (reading, writing), prepare.py and download.py (datasets), cache.py, data.py (batches)
  training     train.py (the entry and the loop), interval.py (an interval's end), settings.py (flags and
               their roles), session.py (one session set up), step.py (the step, evaluation), checkpoint.py
               (save, read, resume), run.py (the run folder: its layout, its record, what may be written over),
               stopping.py (signals, non-finite values), progress.py, dist.py (torchrun), cuda_graph.py
  reading      report.py (python -m lib.report), windows.py (its windows of train NLL), seeds.py (--by_seed),
               page.py (pages to listen with), plots.py, board.py (--tensorboard)
  command line cli.py (the parser, one-line errors, a quiet Ctrl-C)

and here what every module uses: the model registry (each model file registers itself), one-line errors and
warnings, atomic writes.
Nothing in lib imports a script; a model script imports only the models' modules."""
import os
import re
import sys


MODELS = {"twotier": "two_tier", "threetier": "three_tier", "baseline": "baseline"}  # model id -> its script
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "asterisk_en")
MIN_TORCH = (2, 6)  # torch.nn.utils.get_total_norm came in 2.6, fused Adam on the CPU in 2.4


def script_of(model_id):
    """The script that trains a model id's runs (two_tier.py ...), for messages that say what to run."""
    return f"{MODELS[model_id]}.py" if model_id in MODELS else "the script that made it"


def check_torch(version):
    """A UserError if `version` (torch.__version__) is older than MIN_TORCH: one line at start, not an
    AttributeError at the first step."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise UserError(f"torch {version} is older than {need}, which this repository needs: pip install "
                        f"'torch>={need}' (README: Install)")


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


def atomic_write(path, write):
    """write(tmp) to a temporary name next to `path`, then rename it over `path`: a kill, a Ctrl-C or a full disk
    never leaves a partial `path`, and the partial temporary file is removed. OSError -> WriteError(path)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"  # the extension stays last: writers such as soundfile pick the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)
