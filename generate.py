"""Generate audio from a trained run (two-tier, three-tier or baseline).

    python generate.py runs/twotier_fs2_nf64_1795621319 --n 8 --secs 5
    python generate.py runs/twotier_fs2_nf64_1795621319/checkpoints/it0003000.pt --prime speech.wav --plot_softmax

Loads the model and its settings from the checkpoint alone, generates --n sequences of --secs seconds,
--batch at a time, and writes 16-bit WAV files at the dataset's sample rate, decoded with the run's
quantization. The same checkpoint, seed, flags and device give bit-identical files. Sampling uses the fast
path of lib/sample.py (the one the training loop uses too); --reference uses the plain reference loop.
"""
import argparse
import importlib
import math
import os
import time

if __name__ == "__main__":  # before the slow imports: a Ctrl-C while they load is one line, not a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted; the files already written are complete (each is written whole, then renamed)")

import numpy as np
import soxr
import torch

from lib import MODELS, UserError, WriteError, checkpoint, page
from lib.audio import read_mono, write_wav
from lib.cli import ArgumentParser, check_torch, run_script
from lib.quantize import dequantize, normalize, quantize
from lib.plots import animate_softmax, plot_softmax
from lib.sample import BACKENDS, generate
from lib.run import Run, is_run
from lib.settings import as_run_did, choose_device
from lib.step import set_precision

MAX_FILES = 100_000  # per call: every path is named before the first is written
MAX_SECS = 24 * 3600.0  # per sequence: a day of audio (16 kHz: 1.4 G samples, 11 GB of levels per sequence)


def load_run(path, device):
    """(model in eval mode, settings namespace, sample_rate, run folder, iteration, checkpoint path) from a run
    folder (its newest checkpoint that loads) or a checkpoint."""
    if os.path.isdir(path):
        run = Run(path)
        found = checkpoint.newest(run, "generating from", run.record())  # a folder that is no run: its own message
        if found is None:
            raise UserError(f"{path} has no readable checkpoint (checkpoints/it*.pt): pass a run folder that has "
                            f"trained for at least one interval, or a checkpoint file")
        path, ckpt = found
    elif not os.path.isfile(path):
        raise UserError(f"{path} is neither a run folder nor a checkpoint file")
    elif is_run(run_of(path)):
        ckpt = checkpoint.own(Run(run_of(path)), path)  # a checkpoint in a run folder must be the run's own
    else:
        try:
            ckpt = checkpoint.load(path)
        except Exception as e:  # torch raises many types for files that are not checkpoints
            raise UserError(f"{path} is not a checkpoint ({str(e).splitlines()[0][:80]})") from None
    model_id = ckpt.get("model_id") if isinstance(ckpt, dict) else None
    module = ckpt.get("module") or MODELS.get(model_id) if isinstance(ckpt, dict) else None
    if module is None:
        raise UserError(f"{path} holds a model of unknown kind {model_id!r}: expected one of {', '.join(MODELS)}")
    settings = argparse.Namespace(**as_run_did(ckpt["model_id"], ckpt["settings"]))
    model = model_file(module, path).build_model(settings)
    model.load_state_dict(ckpt["model"])
    return (model.to(device).eval(), settings, ckpt["sample_rate"], run_of(path), ckpt.get("state", {}).get("iteration"),
            path)


def model_file(module, path):
    """The model's own file (two_tier.py ...), imported when a checkpoint asks for it: the checkpoint names it
    (older ones: lib.MODELS, by the model's id)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{path} was made by {module}.py, which cannot be imported here ({e}): run generate.py "
                        f"where that model's file is") from None


def run_of(path):
    """The run folder a checkpoint file lies in (RUN/checkpoints/it0000300.pt -> RUN)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(path)))


def load_prime(path, settings, sample_rate, min_len):
    """1-D int levels of a WAV file, quantized as the run's data was; resampled when its rate differs."""
    if not os.path.isfile(path):
        raise UserError(f"--prime {path} is not a file")
    audio, rate = read_mono(path)  # BadAudio (a UserError) names the file and what is wrong
    if rate != sample_rate:
        print(f"note: --prime {path} is at {rate} Hz; resampled to the run's {sample_rate} Hz")
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    if len(audio) < min_len:
        raise UserError(f"--prime {path} has {len(audio)} samples, fewer than one frame ({min_len})")
    x = normalize(torch.from_numpy(audio)[None], settings.zero_dc, settings.norm)
    return quantize(x, settings.q_levels, settings.qtype)[0]


def build_parser():
    p = ArgumentParser(prog="python generate.py", description=__doc__)
    p.add_argument("run", help="run folder (its last checkpoint) or checkpoint file")
    p.add_argument("--best", action="store_true",
                   help="from a run folder, use checkpoints/best.pt (the best valid NLL) instead of the last checkpoint")
    p.add_argument("--n", type=int, default=4, help="sequences to generate")
    p.add_argument("--secs", type=float, default=4.0, help="length of each sequence (seconds)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; < 1 is more conservative)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--prime", default=None, metavar="WAV", help="continue this audio (written before the continuation)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/generated)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same name (same prime, seed and temperature); else refused")
    p.add_argument("--batch", type=int, default=64, help="sequences generated in parallel")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch's, and the compiled step's on the CPU); 0 = torch's default")
    p.add_argument("--no_cuda_graph_sampling", action="store_true",
                   help="on CUDA, launch each step's kernels from Python instead of replaying each step() call "
                        "(about 32 samples) as one CUDA graph, the default")
    p.add_argument("--reference", action="store_true", help="use the plain reference sampler (slow)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                   help="what the fast path steps with; auto = lib.sample.default_backend (numba and numpy: CPU only)")
    p.add_argument("--plot_softmax", action="store_true",
                   help="write softmax.png: the first sequence's predicted distribution over time")
    p.add_argument("--plot_secs", type=float, default=0.25, help="seconds shown in softmax.png")
    p.add_argument("--animate", action="store_true", help="with --plot_softmax, also a GIF of it, step by step")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        run_script(generate_files, args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests)


def check_flags(args):
    """One line for each flag out of range, before anything is loaded."""
    if args.n < 1 or args.batch < 1:
        raise UserError(f"--n and --batch must be at least 1 (got --n {args.n}, --batch {args.batch})")
    if args.n > MAX_FILES:
        raise UserError(f"--n {args.n}: at most {MAX_FILES:,} files per call (run it again with another --seed)")
    for name, most in (("secs", MAX_SECS), ("temperature", math.inf), ("plot_secs", MAX_SECS)):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value) and value <= most):
            raise UserError(f"--{name} must be a positive number" + (f" of at most {most:g}" if most < math.inf else
                                                                       "") + f" (got {value})")
    if not 0 <= args.threads <= 1024:
        raise UserError(f"--threads must be 0 (torch's default) to 1024 (got {args.threads})")
    if not 0 <= args.seed <= 2 ** 32 - 1 - args.n:
        raise UserError(f"--seed must be 0 to 2**32 - 1 - --n (seeds are 32-bit; got {args.seed})")


def output_paths(args, out_dir):
    """(WAV paths, plot paths) in out_dir, named after the prime (if any), the seed and the temperature, checked:
    one never replaces another file without --overwrite, nor a run's page; out_dir is made."""
    base = os.path.join(out_dir, (f"{os.path.splitext(os.path.basename(args.prime))[0]}_" if args.prime else "") +
                        f"seed{args.seed}_temp{args.temperature:g}")
    paths = [f"{base}_{k:03d}.wav" for k in range(args.n)]
    plots = [f"{base}_softmax.png"] + ([f"{base}_softmax.gif"] if args.animate else []) if args.plot_softmax else []
    if is_run(out_dir):
        raise UserError(f"--out {out_dir} is a run folder (its index.html is the run's own page): choose another "
                        f"--out, e.g. {Run(out_dir).generated}")
    page.check_output(os.path.join(out_dir, "index.html"), "folder", args.overwrite, "--out's page")
    existing = [p for p in paths + plots if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists ({len(existing)} of the files to write do): pass --overwrite to replace "
                        f"them, or choose another --out or --seed")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        if args.out is None:  # a run on a read-only mount, say: it samples as it is, into a folder of your own
            raise UserError(f"cannot write {out_dir} ({e.strerror}): give --out, a folder to write the samples "
                            f"to") from None
        raise WriteError(out_dir, e) from None
    return paths, plots


def generate_files(args):
    check_torch(torch.__version__)
    check_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    if args.backend in ("numba", "numpy") and device.type != "cpu":
        raise UserError(f"--backend {args.backend} runs on the CPU only; add --device cpu, or use --backend torch")
    if args.best:
        if not os.path.isdir(args.run):
            raise UserError("--best takes a run folder (it uses RUN/checkpoints/best.pt)")
        args.run = Run(args.run).best
        if not os.path.isfile(args.run):
            raise UserError(f"{args.run} does not exist: the run has not finished an interval with this version")
    model, settings, rate, run_dir, iteration, ckpt_path = load_run(args.run, device)
    set_precision(getattr(settings, "precision", "tf32"))  # as the run's own samples were made (TF32 on CUDA)
    prime = load_prime(args.prime, settings, rate, model.overlap) if args.prime else None
    length = max(1, round(args.secs * rate))
    out_dir = args.out or Run(run_dir).generated
    paths, plots = output_paths(args, out_dir)

    written, gen_secs = [], 0.0
    for first in range(0, args.n, args.batch):
        n = min(args.batch, args.n - first)
        record = args.plot_softmax and first == 0
        start = time.perf_counter()
        result = generate(model, n, length, seed=args.seed + first, temperature=args.temperature, prime=prime,
                          fast=not args.reference, cuda_graph=not args.no_cuda_graph_sampling, record=record, progress=True,
                          backend=None if args.backend == "auto" else args.backend)
        levels, logits = result if record else (result, None)
        levels = levels.cpu()  # waits for the device: the time below is the generation's
        gen_secs += time.perf_counter() - start
        audio = dequantize(levels, settings.q_levels, settings.qtype).numpy()
        if prime is not None:
            head = dequantize(prime, settings.q_levels, settings.qtype).numpy()
            audio = np.concatenate([np.broadcast_to(head, (n, len(head))), audio], axis=1)
        for k, a in enumerate(audio):
            write_wav(paths[first + k], a, rate)
            written.append(paths[first + k])
        if record:
            shown = max(1, round(args.plot_secs * rate))
            probs = torch.softmax(logits[:shown].float() / args.temperature, dim=-1).cpu().numpy()
            title = (f"{os.path.basename(run_dir)}, iteration {iteration}, temperature {args.temperature:g}, "
                     f"seed {args.seed}, sequence 0" +
                     (f"; time 0 is the start of the continuation after {os.path.basename(args.prime)}"
                      if args.prime else ""))
            plot_softmax(probs, levels[0, :shown].cpu().numpy(), rate, plots[0], title)
            if args.animate:
                animate_softmax(probs[:200], levels[0, :200].cpu().numpy(), plots[1])
    index = page.write_folder_page(out_dir, f"{os.path.basename(run_dir)}: generated from iteration {iteration}")
    secs, total = gen_secs, args.n * length
    print(f"sampled from {ckpt_path} (iteration {iteration}); wrote {len(written)} WAV files" +
          (f" and {', '.join(os.path.basename(p) for p in plots)}" if plots else "") + f" to {out_dir} (to listen: "
          f"{index})")
    print(f"generated {args.n} x {length} samples in {secs:.2f} s on {device}: {total / secs:,.0f} samples/s, "
          f"{total / secs / rate:.2f}x real time")


if __name__ == "__main__":
    main()
