"""How much like the speech they learn from a run's samples are, in numbers (notes/sampling.md uses them):

    python scripts/sound_stats.py "runs/RUN/samples/it0019811_*.wav" "data/asterisk_en/valid/*"

For each pattern, over its files' 32 ms frames: the share below -40 dBFS (pauses), and of the louder frames the
median spectral flatness (near 0 for harmonics, near 1 for hiss), the share that is voiced (a normalized
autocorrelation peak of at least 0.5 at a pitch of 80-400 Hz), and the voiced frames' pitch."""
import argparse
import glob

import numpy as np
import soundfile as sf

FRAME_SECS = 0.032
QUIET_DB = -40.0
PITCH_HZ = (80, 400)


def frame_stats(frame, rate):
    """(spectral flatness, pitch in Hz or None when unvoiced) of one frame."""
    n = len(frame)
    power = np.abs(np.fft.rfft(frame * np.hanning(n))) ** 2 + 1e-12
    flatness = float(np.exp(np.log(power).mean()) / power.mean())
    centred = frame - frame.mean()
    ac = np.correlate(centred, centred, "full")[n - 1:]
    ac = ac / (ac[0] + 1e-12)
    lo, hi = int(rate / PITCH_HZ[1]), min(int(rate / PITCH_HZ[0]), n - 1)
    peak = lo + int(ac[lo:hi].argmax())
    return flatness, (rate / peak if ac[peak] >= 0.5 else None)


def sound_stats(paths):
    """{'files', 'quiet', 'loud_frames', 'flatness', 'voiced', 'pitch_hz': (25%, 50%, 75%)} over the files."""
    quiet, flatness, pitches, loud = [], [], [], 0
    for path in paths:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(1)
        n = int(FRAME_SECS * rate)
        frames = audio[:len(audio) // n * n].reshape(-1, n)
        db = 20 * np.log10(np.sqrt((frames.astype(np.float64) ** 2).mean(1)) + 1e-12)
        quiet.extend(db < QUIET_DB)
        for frame in frames[db >= QUIET_DB]:
            loud += 1
            flat, pitch = frame_stats(frame, rate)
            flatness.append(flat)
            if pitch is not None:
                pitches.append(pitch)
    return {"files": len(paths), "quiet": float(np.mean(quiet)) if quiet else float("nan"), "loud_frames": loud,
            "flatness": float(np.median(flatness)) if flatness else float("nan"),
            "voiced": len(pitches) / loud if loud else float("nan"),
            "pitch_hz": tuple(np.percentile(pitches, (25, 50, 75)).round()) if pitches else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="+", help="glob patterns of audio files (quote them)")
    for pattern in p.parse_args().patterns:
        paths = sorted(glob.glob(pattern))
        if not paths:
            print(f"{pattern}: no files")
            continue
        s = sound_stats(paths)
        pitch = f"pitch {s['pitch_hz'][1]:.0f} Hz ({s['pitch_hz'][0]:.0f}-{s['pitch_hz'][2]:.0f})" if s["pitch_hz"] \
            else "no voiced frames"
        print(f"{pattern}: {s['files']} files, {s['quiet']:.0%} of frames below {QUIET_DB:.0f} dBFS; of "
              f"{s['loud_frames']} louder ones flatness {s['flatness']:.3f}, voiced {s['voiced']:.0%}, {pitch}")


if __name__ == "__main__":
    main()
