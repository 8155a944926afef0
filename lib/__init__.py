"""What the scripts share, one concern a module:

  models       layers.py (GRUs, weight norm), quantize.py, sample.py (the reference sampler; kernels.py and
               teams.py its compiled fast step)
  data         audio.py (reading, writing), prepare.py and download.py (datasets), cache.py, data.py (batches)
  training     train.py (the entry and the loop), settings.py (flags), session.py (one session set up),
               step.py (the step, evaluation), checkpoint.py (save, read, resume), run.py (the run folder),
               stopping.py (signals, non-finite values), progress.py, dist.py (torchrun), cuda_graph.py
  reading      report.py (python -m lib.report), seeds.py (its --by_seed), page.py (pages to listen with),
               plots.py, board.py (--tensorboard)

and here the few helpers every script uses: the model registry, one-line errors, atomic writes, a quiet Ctrl-C.
Nothing in lib imports a script; a model script imports only the models' modules."""
import argparse
import difflib
import os
import re
import signal
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but every flag's help shows its default, and a bad flag is one line (not the whole usage)
    and exit status 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def parse_known_args(self, args=None, namespace=None):
        """--frame-size is --frame_size: the dashed spelling of every flag is accepted."""
        args = sys.argv[1:] if args is None else list(args)
        known = set(self._option_string_actions)
        args = [dashed_to_underscores(a, known) for a in args]
        return super().parse_known_args(args, namespace)

    def error(self, message):
        unknown = re.search(r"unrecognized arguments: (--[\w-]+)", message)
        if unknown:
            near = difflib.get_close_matches(unknown.group(1), list(self._option_string_actions), n=1)
            if near:
                message += f" (did you mean {near[0]}?)"
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def dashed_to_underscores(arg, known):
    if not arg.startswith("--") or "-" not in arg[2:]:
        return arg
    name, eq, value = arg.partition("=")
    fixed = "--" + name[2:].replace("-", "_")
    return fixed + eq + value if fixed in known and name not in known else arg


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and '(default: X)' after each flag's help, unless the help already says
    what the default is."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run_script(work, *args):
    """A script's work: bad input (UserError) is one line and exit status 2, a failed write (WriteError) one line
    and exit status 1; never a traceback for either."""
    try:
        return work(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


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


def quiet_interrupts(message):
    """Ctrl-C (SIGTERM, SIGHUP) while a script starts up or works without its own handlers: `message` as one line
    (None: nothing, when the script has said how it ended), exit status 128 + the signal, no traceback. Scripts
    call it before their slow imports."""
    def stop(signum, frame):
        try:
            if message:
                print(f"\n{message}", file=sys.stderr, flush=True)
        except OSError:  # the terminal is gone (SIGHUP)
            pass
        if importing(frame):  # an exception unwinding through a C extension's initialization can abort Python
            os._exit(128 + signum)  # nothing has been written yet
        raise SystemExit(128 + signum)
    stop.quiet = True  # what lib.train looks for: this process's script set these handlers
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def importing(frame):
    """Whether `frame` runs inside an import statement (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False
