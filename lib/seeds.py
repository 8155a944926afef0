"""Settings over seeds (python -m lib.report --by_seed): runs that differ only by --seed form one setting; each NLL
column's mean and spread (largest minus smallest) over its seeds; and the lab notebook's rule: a setting is
separated from the best one when the gap between their means is more than twice the larger of their spreads. A
setting of one seed has no spread and is never called separated."""
DASH = "\u2014"  # a missing value, here and in lib/report.py
METRICS = {"test_at_best": "test at best", "best_valid": "best valid"}


def seed_groups(summaries, setting_keys):
    """Runs of one setting (setting_keys: one per run, what the run is apart from its seed), grouped, in the order
    they came."""
    groups = {}
    for s, key in zip(summaries, setting_keys):
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def trained(group):
    """What a group's seeds trained: iterations and hours, a range where they differ, and why in words: seeds of an
    equal-time budget on machines of different speed make different numbers of steps (more than 5% apart)."""
    iters = [s["iterations"] for s in group]
    hours = [s["hours"] for s in group]
    text = f"{min(iters):,}" + (f"-{max(iters):,}" if max(iters) != min(iters) else "") + " it, " + \
        f"{min(hours):.3f}" + (f"-{max(hours):.3f}" if f"{max(hours):.3f}" != f"{min(hours):.3f}" else "") + " h"
    if max(iters) > 1.05 * min(iters):
        text += " (steps differ by " + f"{max(iters) / min(iters) - 1:.0%}" + \
            (": machines of different speed" if max(hours) <= 1.01 * min(hours) else "") + ")"
    return text


def nll_columns(summary):
    """{column: value} of a run's NLL columns: the windows' mean train NLL, best valid, test at best."""
    return {**{f"train {w} (time)": v for w, v in summary["time_windows"].items()},
            **{f"train {w} (iters)": v for w, v in summary["iter_windows"].items()},
            "best valid": summary["best_valid"], "test at best": summary["test_at_best"]}


def over_seeds(group):
    """{column: {"mean", "spread", "values"}} of a group of runs; mean and spread None where a run has no value,
    spread None for one seed."""
    columns = [nll_columns(s) for s in group]
    out = {}
    for name in columns[0]:
        values = [c[name] for c in columns]
        known = None not in values
        out[name] = {"values": values, "mean": sum(values) / len(values) if known else None,
                     "spread": max(values) - min(values) if known and len(values) > 1 else None}
    return out


def verdicts(stats, metric):
    """Each setting against the best one on `metric` (the lowest mean): the gap, and whether it is more than twice
    the larger of the two spreads -> [(gap or None, separated: True, False, or None where it cannot be called)]."""
    means = [st[metric]["mean"] for st in stats]
    best = min((i for i, m in enumerate(means) if m is not None), key=lambda i: means[i], default=None)
    out = []
    for st in stats:
        ours, theirs = st[metric], stats[best][metric] if best is not None else None
        if ours["mean"] is None or theirs is None:
            out.append((None, None))
            continue
        gap = ours["mean"] - theirs["mean"]
        if ours is theirs or ours["spread"] is None or theirs["spread"] is None:
            out.append((gap, None))
        else:
            out.append((gap, gap > 2 * max(ours["spread"], theirs["spread"])))
    return out


def verdict_text(gap, separated, one_seed):
    if gap is None:
        return DASH
    if gap == 0 and separated is None and not one_seed:
        return "best"
    if separated is None:
        return f"+{gap:.3f}: one seed, not called" if gap else "best (one seed)"
    return f"+{gap:.3f}: {'separated' if separated else 'not separated'}"
