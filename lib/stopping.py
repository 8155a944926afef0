"""How a run stops early without losing more than a step: signals (Ctrl-C, SIGTERM, SIGHUP) noted and acted on after the
current step, and non-finite values refused before anything is saved from them."""
import math
import os
import signal
import threading

import torch

from lib.progress import duration


class Interrupts:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP during the loop: the first sets .signum and says so in the log at once, and the
    loop saves after the current step and exits 128 + signum; a second one aborts (KeyboardInterrupt), even inside
    the save, whose temporary file is then removed (lib.run.atomic_write). Handlers are restored afterwards.
    Python runs a signal handler only between bytecodes of the main thread, which a torch op of many seconds holds;
    but its C-level handler writes each signal's number to the wakeup pipe (signal.set_wakeup_fd) as it arrives, so
    a thread that waits on the pipe answers at once, whatever the step is doing.
    Under torchrun a second signal is ignored: Ctrl-C reaches every process and torchrun, which then sends each
    a SIGTERM of its own; torchrun kills the processes itself if they take too long (30 s)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed (ssh without nohup)
    STOP = b"\0"  # no signal's number: the watcher's own end

    def __init__(self, second_aborts=True, say=None):
        self.second_aborts, self.say = second_aborts, say
        self.step_secs = None  # the measured time of a step, once known (for the line a first signal prints)

    def __enter__(self):
        self.signum, self.previous, self.watcher = None, {}, None
        self.seen = self.handled = 0  # signals the watcher read, and handler calls (Python merges a repeated one)
        self.aborted, self.lock = False, threading.Lock()
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
            self.pipe = os.pipe()
            os.set_blocking(self.pipe[1], False)  # the C handler must never wait
            self.previous_fd = signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
            self.watcher = threading.Thread(target=self.watch, name="signals", daemon=True)
            self.watcher.start()
        return self

    def watch(self):
        """Beside the main thread: each byte on the pipe is a signal that has just arrived."""
        while True:
            for signum in os.read(self.pipe[0], 64):
                if signum == self.STOP[0]:
                    return
                with self.lock:
                    self.seen += 1
                if self.seen == 1:
                    self.arrived(signum)

    def arrived(self, signum):
        """The first signal: noted once (by the watcher or the main thread's handler, whichever comes first)."""
        with self.lock:
            if self.signum is not None:
                return
            self.signum = signum
        if signum == signal.SIGHUP:
            leave_terminal()
        if self.say is not None:  # at once: a step can take many seconds, and silence invites a second Ctrl-C
            about = f" (about {duration(self.step_secs)})" if self.step_secs else ""
            self.say(f"stopping after the current step{about}, then saving a checkpoint" +
                     ("; a second Ctrl-C stops at once, without saving" if self.second_aborts else ""))

    def handle(self, signum, frame):
        """The main thread's handler, between bytecodes: the second signal (counted here or by the watcher: two
        signals during one long op call this once) aborts."""
        if self.aborted:
            return
        with self.lock:
            self.handled += 1
            second = max(self.handled, self.seen) >= 2
        if second and self.second_aborts:
            self.aborted = True
            raise KeyboardInterrupt
        self.arrived(signum)

    def requested(self):
        return self.signum is not None

    def __exit__(self, *exc):
        if self.watcher is not None:
            os.write(self.pipe[1], self.STOP)
            self.watcher.join()
            signal.set_wakeup_fd(self.previous_fd)
            os.close(self.pipe[0])
            os.close(self.pipe[1])
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def leave_terminal():
    """After SIGHUP the terminal is gone and a write to it fails (EIO): standard output and error that were a
    terminal now go nowhere, so the run's lines still reach log.txt and the save is not stopped by a print."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


class NonFinite(Exception):
    """Training produced a non-finite value; nothing from it was saved."""


def non_finite(model, values):
    """Names of what is not finite: 'parameters' and the keys of `values` ({name: float})."""
    bad = [] if all(torch.isfinite(p).all() for p in model.parameters()) else ["parameters"]
    return bad + [name for name, v in values.items() if not math.isfinite(v)]
