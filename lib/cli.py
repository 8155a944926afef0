"""The command line every script shares: flags parsed with their defaults in --help and the dashed spelling
accepted, a bad flag or bad input as one line with exit status 2 (a failed write: 1), and a quiet Ctrl-C while a
script starts up. Light on purpose: scripts import it before their slow imports."""
import argparse
import difflib
import os
import re
import signal
import sys

from lib import MODELS, UserError, WriteError

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
