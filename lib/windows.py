"""The report's windows of train NLL: parsed from flags (0-5m,25-30m; 0-10K,90K-100K), the mean over a window of
a run's metrics rows (each interval weighted by its steps inside the window; a window the run has not reached to
its end is None, never a number), and the windows fitted to runs when none are asked for."""
import math
import os
import re

import numpy as np

from lib import UserError, warn
from lib.run import Run


def parse_windows(text, units):
    """'0-5m,25-30m' -> [(label, start, end)] in base units; units: suffix -> multiplier ('' = the default)."""
    windows = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([\d.]+)([a-zA-Z]*)\s*-\s*([\d.]+)([a-zA-Z]*)\s*", part)
        if not m or m.group(2) not in units or m.group(4) not in units:
            raise UserError(f"window {part!r} is not START-END with units {', '.join(u for u in units if u)} "
                            f"(e.g. 0-5m or 90K-100K)")
        start = float(m.group(1)) * units[m.group(2) or m.group(4)]
        end = float(m.group(3)) * units[m.group(4)]
        if not end > start:
            raise UserError(f"window {part!r} ends before it starts")
        windows.append((part.strip(), start, end))
    return windows


TIME_UNITS = {"": 3600, "h": 3600, "m": 60, "s": 1}
ITER_UNITS = {"": 1, "K": 1000, "k": 1000, "M": 10 ** 6}
def window_mean(rows, key, start, end):
    """Mean train NLL over [start, end) of `key` (train_secs or iteration); None if the run did not reach `end`.
    Each interval (previous row's key, this row's key] is weighted by its steps inside the window."""
    if not rows or rows[-1][key] < end:
        return None
    total = weight = 0.0
    prev_key, prev_it = 0.0, 0
    for r in rows:
        span = r[key] - prev_key
        inside = max(0.0, min(r[key], end) - max(prev_key, start))
        if span > 0 and inside > 0:
            w = (r["iteration"] - prev_it) * inside / span  # the interval's steps inside the window
            total += r["train_bits"] * w
            weight += w
        prev_key, prev_it = r[key], r["iteration"]
    return total / weight if weight else None


ROW_KEYS = ("iteration", "train_secs", "train_bits", "valid_bits")  # what every metrics row must hold
def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


DEFAULT_WINDOWS = ("0-1h,11-12h", "0-10K,90K-100K")  # the original notebook's: the first and the 12th hour
def fitting_windows(runs):
    """Windows for runs when none are asked for: the defaults where the shortest run reaches them, else the first
    and the last tenth of the shortest run (so that a short run's own row is not all dashes). Where that run is
    less than half as long as the longest, one line says which run cut the windows and how to choose them."""
    ends = [(rows[-1], r) for rows, r in ((read_metrics_quietly(r), r) for r in runs)  # runs the report can show
            if any(np.isfinite(row["valid_bits"]) for row in rows)]
    if not ends:
        return DEFAULT_WINDOWS
    end = math.floor(min(e["train_secs"] for e, _ in ends) * 1000) / 1000  # rounded down: the run reaches it
    iters = min(e["iteration"] for e, _ in ends)
    def secs(x):  # to the millisecond, never rounded up past the run's end
        return f"{math.floor(x * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
    time_windows = DEFAULT_WINDOWS[0] if end >= 12 * 3600 or end < 0.01 else \
        f"0-{secs(end / 10)}s,{secs(end * 0.9)}-{secs(end)}s"
    iter_windows = DEFAULT_WINDOWS[1] if iters >= 100_000 or iters < 10 else \
        f"0-{iters // 10},{iters - iters // 10}-{iters}"
    for key, cut, fitted in (("train_secs", end, time_windows), ("iteration", iters, iter_windows)):
        shortest, run = min(ends, key=lambda e: e[0][key])
        longest = max(e[key] for e, _ in ends)
        if fitted not in DEFAULT_WINDOWS and longest > 2 * shortest[key]:
            flag, unit = ("--time_windows", "s of training") if key == "train_secs" else ("--iter_windows", "iterations")
            warn(f"the {flag[2:].replace('_', ' ')} ({fitted}) are cut by the shortest run, "
                 f"{os.path.basename(os.path.normpath(run))} ({amount(shortest[key])} {unit}; the longest has "
                 f"{amount(longest)}): set {flag} to compare the others further")
    return time_windows, iter_windows


def read_metrics_quietly(run_dir):
    try:
        return [r for r in Run(run_dir).metrics(quiet=True) if all(is_number(r.get(k)) for k in ROW_KEYS)]
    except OSError:
        return []


def amount(x):
    """An iteration count with thousands separators, seconds to four significant digits."""
    return f"{x:,}" if isinstance(x, int) else f"{x:,.4g}"
