"""Reading run metrics and plotting learning curves (several runs on one figure)."""
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs, path):
    """runs: {name: metrics rows}. Train (solid) and valid (dashed) bits per sample by training hours and by iteration."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in runs.items():
        if not rows:
            continue
        for ax, x_key, scale in ((axes[0], "train_secs", 1 / 3600), (axes[1], "iteration", 1)):
            x = [r[x_key] * scale for r in rows]
            line, = ax.plot(x, [r["train_bits"] for r in rows], label=f"{name} train")
            ax.plot(x, [r["valid_bits"] for r in rows], "--", color=line.get_color(), label=f"{name} valid")
    for ax, label in zip(axes, ("training time (hours)", "iteration")):
        ax.set_xlabel(label)
        ax.set_ylabel("NLL (bits per sample)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
