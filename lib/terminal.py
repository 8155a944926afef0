"""The person at a run's terminal: what the run tells them while it trains (a bar on a terminal, plain lines in a
file; the measured speed, when the first interval and the end will come, a warning when the budget would pass over
the data many times), and what they tell it: a signal (Ctrl-C, SIGTERM, SIGHUP) stops the run after the current
step, with nothing lost but that step."""
import math
import os
import signal
import sys
import threading
import time

from tqdm import tqdm

SLOW_STEP = 1.0  # seconds: a step this slow on a CPU is said at once, and the model is sized for a GPU
SPEED_STEPS = 5  # the speed line comes after this many steps (the first step, a warm-up, is not counted)
RECHECK_STEPS = 50  # ... and is said again, measured over this many more, if it was off by over 1.5x
PROGRESS_SECS = 300  # without a terminal, a plain progress line this often (wall seconds)
PASSES_WARNING = 20  # warn when the budget would pass over the train split more often than this


def training_left(args, state, secs_per_it):
    """Seconds of training left in the run's budget (--stop_time, and --stop_iters at this speed)."""
    left = args.stop_time * 3600 - state["train_secs"]
    if args.stop_iters:
        left = min(left, (args.stop_iters - state["iteration"]) * secs_per_it)
    return max(0.0, left)


class Terminal:
    """A terminal's stream whose writes end quietly once the terminal is gone (a closed ssh session: EIO until
    SIGHUP's handler points it at /dev/null), so that a progress bar never stops the run or its save."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Progress:
    """How far the run is toward the budget that stops it: iterations when --stop_iters is given, else training
    time. On a terminal a tqdm bar, erased at the end so that the run's last line (how to continue) stays last;
    otherwise (a file, nohup) a plain line every PROGRESS_SECS. Once, after the
    first few steps, a line with the measured speed and when the first interval and the end will come."""

    def __init__(self, args, state, log, device, samples_per_step, shown=True):
        self.args, self.log, self.device, self.samples_per_step = args, log, device, samples_per_step
        self.by_iters = bool(args.stop_iters)
        disable = None if shown else True  # None: shown on a terminal
        if self.by_iters:
            self.bar = tqdm(total=args.stop_iters, initial=state["iteration"], unit="it", disable=disable,
                            dynamic_ncols=True, file=Terminal(sys.stderr), leave=False)
        else:
            self.bar = tqdm(total=round(args.stop_time * 3600), initial=round(state["train_secs"]), disable=disable,
                            dynamic_ncols=True, file=Terminal(sys.stderr), leave=False,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training [{elapsed}<{remaining}{postfix}]")
        self.timing, self.timed_steps, self.timed_secs, self.last_line = False, 0, 0.0, time.time()
        self.spoken, self.rechecked, self.hinted = None, False, False

    def step(self, state, interval, step_secs, synced=True):
        """synced: whether the loop waited for the device at this step. Steps are timed from the first such wait
        (on the CPU, every step; the first step warms up: allocations, kernels), and the speed line comes at a
        wait, so that on CUDA it counts the steps' work, not only their launches."""
        if self.timing:
            self.timed_secs += step_secs
            self.timed_steps += 1
        elif synced and step_secs > SLOW_STEP and self.device.type == "cpu":  # a slow first step: said now
            self.speed_line(state, interval, step_secs, "the first step (with its warm-up)")
        self.timing = self.timing or synced
        secs_per_it = self.timed_secs / max(1, self.timed_steps)
        if not self.spoken and synced and self.timed_steps >= SPEED_STEPS:
            self.spoken = (self.timed_steps, self.timed_secs, secs_per_it)
            self.speed_line(state, interval, secs_per_it)
        elif self.spoken and not self.rechecked and synced and self.timed_steps >= self.spoken[0] + RECHECK_STEPS:
            # the first steps can be far slower than the rest (allocations, caches, compilation): said again if so
            self.rechecked = True
            steps, secs, said = self.spoken
            recent = (self.timed_secs - secs) / (self.timed_steps - steps)
            if not 1 / 1.5 < recent / said < 1.5:
                self.speed_line(state, interval, recent,
                                f"speed over the last {self.timed_steps - steps} steps (the first were "
                                f"{max(said / recent, recent / said):.1f} times as "
                                f"{'slow' if said > recent else 'fast'})")
        self.bar.update(1 if self.by_iters else step_secs)
        if synced and not self.bar.disable:  # the loop has just waited for the device: reading the sum is free
            self.bar.set_postfix(refresh=False, **({} if self.by_iters else {"iter": f"{state['iteration']:,}"}),
                                 bits=f"{float(interval['bits']) / interval['steps']:.3f}",
                                 **{"s/it": f"{(secs_per_it if self.timed_steps else step_secs):.3g}"})
        if self.bar.disable and time.time() - self.last_line >= PROGRESS_SECS:
            self.last_line = time.time()
            left = training_left(self.args, state, secs_per_it)
            self.log(f"progress: iteration {state['iteration']:,}, {state['train_secs'] / 3600:.3f} h of training | "
                     f"{secs_per_it:.3f} s per iteration | train {float(interval['bits']) / interval['steps']:.3f} bits/sample "
                     f"since the last interval | {duration(left)} of training left")

    def secs_per_it(self):
        return self.timed_secs / self.timed_steps if self.timed_steps else None

    def speed_line(self, state, interval, secs_per_it, what="speed"):
        args = self.args
        if args.print_iters:
            to_interval = (args.print_iters - state["iteration"] % args.print_iters) % args.print_iters * secs_per_it
        else:
            to_interval = args.print_time - interval["secs"]
        to_end = training_left(args, state, secs_per_it)
        to_interval = min(to_interval, to_end)
        self.log(f"{what}: {secs_per_it:.3f} s per iteration ({self.samples_per_step / secs_per_it:,.0f} samples/s); "
                 f"the first interval (valid NLL, checkpoint, samples) in about {duration(to_interval)} of training "
                 f"({clock(to_interval)}), the end of the run in about {duration(to_end)} ({clock(to_end)})")
        if self.device.type == "cpu" and secs_per_it > SLOW_STEP and not self.hinted:
            self.hinted = True  # by its steps, not its interval: a small model with a long interval is not told
            self.log(f"note: at {duration(secs_per_it)} a step this model is sized for a GPU. On a CPU, --preset tiny "
                     f"runs in seconds, and --dim 128 --n_rnn 1 --batch_size 16 --print_time 300 babbles in the "
                     f"speaker's pitch within ten minutes")

    def say_end(self, state, end_secs):
        """Once, after the session's first interval end (its evaluation, checkpoint, samples and page took
        end_secs of wall time): when the run will end, counting the interval ends still to come, which the speed
        line's estimate leaves out -> True once said."""
        secs_per_it = self.secs_per_it()
        if secs_per_it is None:
            return False
        args, train = self.args, training_left(self.args, state, secs_per_it)
        if args.print_iters:
            steps = train / secs_per_it
            if args.stop_iters and state["iteration"] + steps >= args.stop_iters - 1:  # iterations end the run
                steps = args.stop_iters - state["iteration"]
            ends = math.ceil(steps / args.print_iters)
        else:
            ends = math.ceil(train / args.print_time)
        total = train + ends * end_secs
        self.log(f"the interval's end took {duration(end_secs)} (valid NLL, checkpoint, samples, page); with "
                 f"{duration(train)} of training and {ends} more interval end(s) left, the run ends in about "
                 f"{duration(total)} ({clock(total)})")
        return True

    def close(self):
        self.bar.close()


def warn_of_many_passes(args, state, interval, clips_per_step, chunks_per_epoch, log):
    """Once, at the first interval: the passes over the train split that the budget means at the measured speed."""
    secs_per_it = interval["secs"] / interval["steps"]
    iters = state["iteration"] + training_left(args, state, secs_per_it) / secs_per_it
    passes = iters * clips_per_step / chunks_per_epoch
    if passes > PASSES_WARNING:
        log(f"warning: at this speed the run's budget passes over the train split about {passes:,.0f} times; "
            f"expect it to overfit (checkpoints/best.pt keeps the best valid NLL; --patience stops early). "
            f"README's \"Bigger data\" shows how to train on more audio")


def duration(secs):
    return f"{secs:.1f} s" if secs < 10 else f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} min" if secs < 7200 else f"{secs / 3600:.1f} h"


def clock(secs_from_now):
    """The wall-clock time in secs_from_now seconds, e.g. 'at 14:05' or 'at 09:30 on Fri 27 Nov'."""
    then = time.localtime(time.time() + secs_from_now)
    same_day = time.strftime("%Y%m%d", then) == time.strftime("%Y%m%d")
    return "at " + time.strftime("%H:%M" if same_day else "%H:%M on %a %d %b", then)


def rss_mb():
    """Resident memory of this process now (MB), from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, AttributeError):
        return None


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
        self.stopping = threading.Event()  # set with the first signal: what evaluation and sampling check
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
            self.stopping.set()
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
