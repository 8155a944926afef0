"""How a run stops early without losing more than a step: signals (Ctrl-C, SIGTERM) noted and acted on after the
current step, and non-finite values refused before anything is saved from them."""
import math
import signal
import threading

import torch

from lib.progress import duration


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM during the loop: the first sets .signum, and the loop saves after the current
    step and exits 128 + signum; a second one aborts at once (KeyboardInterrupt), even inside the save, whose
    temporary file is then removed (lib.atomic_write). Handlers are restored afterwards.
    Under torchrun a second signal is ignored: Ctrl-C reaches every process and torchrun, which then sends each
    a SIGTERM of its own; torchrun kills the processes itself if they take too long (30 s)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_aborts=True, say=None):
        self.second_aborts, self.say = second_aborts, say
        self.step_secs = None  # the measured time of a step, once known (for the line a first signal prints)

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            if self.second_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.say is not None:  # at once: a step can take many seconds, and silence invites a second Ctrl-C
            about = f" (about {duration(self.step_secs)})" if self.step_secs else ""
            self.say(f"stopping after the current step{about}, then saving a checkpoint" +
                     ("; a second Ctrl-C stops at once, without saving" if self.second_aborts else ""))

    def requested(self):
        return self.signum is not None

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFinite(Exception):
    """Training produced a non-finite value; nothing from it was saved."""


def non_finite(model, values):
    """Names of what is not finite: 'parameters' and the keys of `values` ({name: float})."""
    bad = [] if all(torch.isfinite(p).all() for p in model.parameters()) else ["parameters"]
    return bad + [name for name, v in values.items() if not math.isfinite(v)]
