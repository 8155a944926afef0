"""The figures: learning curves (training and the report draw them), the predicted distribution (generate.py),
spectrograms side by side (experiments.md's figures)."""
import os

import matplotlib
import numpy as np

from lib.run import atomic_write

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(runs, path):
    """runs: {name: metrics rows}. Train (solid) and valid (dashed) bits per sample by training hours and by
    iteration; the legend sits outside the axes, and the figure grows taller when the legend needs it."""
    legend_lines = sum(2 * (name.count("\n") + 1) for name, rows in runs.items() if rows)  # train and valid
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4.8, 0.8 + 0.16 * legend_lines)))
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
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.76, 0.97), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.75, 1))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def plot_softmax(probs, sampled, sample_rate, path, title=None):
    """probs (T, Q) per step, sampled (T,) levels: time on x, level on y, probability as colour (log scale,
    so the tails show), the sampled level drawn on top; the y range is zoomed to the levels in use."""
    from matplotlib import patheffects
    from matplotlib.colors import LogNorm
    fig, ax = plt.subplots(figsize=(12, 5))
    t_ms = len(probs) / sample_rate * 1000
    image = ax.imshow(np.maximum(probs.T, 1e-5), origin="lower", aspect="auto", cmap="magma",
                      norm=LogNorm(vmin=1e-5, vmax=1.0), extent=(0, t_ms, -0.5, probs.shape[1] - 0.5),
                      interpolation="nearest")
    # a bright line with a dark outline stands out over the dense bands of probability
    ax.plot((np.arange(len(sampled)) + 0.5) / sample_rate * 1000, sampled, "-", color="#39ff14", linewidth=1.0,
            label="sampled level", path_effects=[patheffects.withStroke(linewidth=2.2, foreground="black")])
    if title:
        ax.set_title(title, fontsize=9)
    used = np.nonzero((probs > 1e-3).any(axis=0))[0]
    ax.set_ylim(max(-0.5, used.min() - 8), min(probs.shape[1] - 0.5, used.max() + 8))
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("quantization level")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(image, ax=ax, label="probability")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def animate_softmax(probs, sampled, path):
    """A GIF of the predicted distribution step by step (Pillow), the sampled level marked."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    fig, ax = plt.subplots(figsize=(6, 3.5))
    levels = np.arange(probs.shape[1])
    line, = ax.plot(levels, probs[0], drawstyle="steps-mid", color="tab:blue")
    marker = ax.axvline(sampled[0], color="tab:red", linewidth=1, label="sampled")
    ax.set_ylim(0, float(probs.max()) * 1.05)
    ax.set_xlabel("quantization level")
    ax.set_ylabel("probability")
    ax.legend(loc="upper right", fontsize=8)

    def show(t):
        line.set_ydata(probs[t])
        marker.set_xdata([sampled[t], sampled[t]])
        ax.set_title(f"step {t}")
        return line, marker
    FuncAnimation(fig, show, frames=len(probs)).save(path, writer=PillowWriter(fps=10))
    plt.close(fig)


def plot_spectrograms(wavs, path, secs=2.0, labels=None):
    """One row per audio file (labelled by `labels`, or its path's last three parts): log-magnitude spectrogram of
    its first `secs` seconds, on one colour scale, so that real and generated audio can be compared by eye."""
    import soundfile as sf
    labels = labels or [os.path.join(*wav.split(os.sep)[-3:]) for wav in wavs]
    fig, axes = plt.subplots(len(wavs), 1, figsize=(10, 1.9 * len(wavs)), squeeze=False, sharex=True)
    for ax, wav, label in zip(axes[:, 0], wavs, labels):
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        audio = audio[:int(secs * rate), 0]
        with np.errstate(divide="ignore"):  # digital silence is -inf dB: drawn as the floor
            ax.specgram(audio, NFFT=256, Fs=rate, noverlap=192, cmap="magma", vmin=-120, vmax=-20)
        ax.set_ylabel("Hz")
        ax.set_title(label, fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=72))
    finally:
        plt.close(fig)


# ---- the report

# settings that do not change a result (test_on_best: a flag older runs have, which only added test evaluations)
