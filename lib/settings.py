"""The training flags: their defaults and help, presets, what a resumed run takes from its checkpoint and what a
session may change, the checks that refuse bad values with one line, and the device, chosen once."""
import argparse
import math
import os
import re

import torch

from lib import DEFAULT_DATA, UserError, dist
from lib.cli import ArgumentParser, script_of
from lib.quantize import NORMS, QTYPES, check_q_levels
from lib.run import is_run

PRECISIONS = ("fp32", "tf32", "bf16")

# Every flag's role: the one table that resume, the report, --by_seed, the curve legends and the node check read.
# A flag no model or training code knows without a role here fails tests/test_settings_roles.py.
MODEL = "model"            # what the model is
DATA = "data"              # what it learns from, and how the audio is quantized
TRAINING = "training"      # how it trains
BUDGET = "budget"          # how long it trains
EVALUATION = "evaluation"  # what its valid NLL is measured on: part of the run, since best.pt is chosen by it
OUTPUT = "output"          # what it writes, and how often: no number of its training changes
PLACE = "place"            # where it is written
SESSION = "session"        # this command only: how it runs here (device, threads), or what it does now
ROLES = {
    **dict.fromkeys(("frame_size", "n_frames", "seq_len", "dim", "n_rnn", "emb_size", "ipcost", "mlp_first_relu",
                     "frame_init", "big_frame_size", "input"), MODEL),
    **dict.fromkeys(("data", "clip_secs", "q_levels", "qtype", "zero_dc", "norm"), DATA),
    **dict.fromkeys(("batch_size", "lr", "grad_clip", "seed", "precision"), TRAINING),
    **dict.fromkeys(("stop_time", "stop_iters", "patience"), BUDGET),
    "valid_clips": EVALUATION,
    **dict.fromkeys(("print_time", "print_iters", "n_samples", "sample_secs", "keep_checkpoints", "tensorboard"),
                    OUTPUT),
    **dict.fromkeys(("name", "runs_dir", "run_dir"), PLACE),
    **dict.fromkeys(("resume", "device", "threads", "cuda_graph_step", "preset", "dry_run", "accept_changed_data"),
                    SESSION),
}
# what a run made before a flag existed did: the behaviour of the code that made it (here each is today's default)
BEFORE_IT_EXISTED = {"precision": "tf32", "patience": 0, "threads": 0, "keep_checkpoints": 0,
                     "accept_changed_data": False, "cuda_graph_step": False, "mlp_first_relu": "on",
                     "frame_init": "lecun", "tensorboard": False, "run_dir": None}
FLAGS_OF = {"mlp_first_relu": {"twotier", "threetier"}, "frame_init": {"twotier", "threetier"}}  # else: every model
RENAMED = {"cuda_graph": "cuda_graph_step"}  # flags renamed since older runs were made: old name -> new
DROPPED = {"test_on_best"}  # flags older runs may have saved that no longer exist

# what a session may change when it resumes a run (--data: when the data there is the run's own, its fingerprint)
RESUMABLE = {k for k, role in ROLES.items() if role in (BUDGET, OUTPUT, PLACE, SESSION)} | {"data"}
A_SETTING = (MODEL, DATA, TRAINING, BUDGET, EVALUATION)  # what tells two runs' settings apart in the report
SHAPES_CURVES = (MODEL, DATA, TRAINING)  # what a curve's legend names
SAME_ON_EVERY_NODE = (MODEL, DATA, TRAINING, BUDGET, EVALUATION, OUTPUT)  # ranks that differ here part ways


def role(flag):
    """A flag's role; a flag this code does not know (saved by a later version) counts as a setting."""
    return ROLES.get(flag, MODEL)


SHORT = {"frame_size": "fs", "n_frames": "nf", "big_frame_size": "bfs", "seq_len": "sl", "n_rnn": "nrnn",
         "emb_size": "emb", "batch_size": "bs", "q_levels": "q", "clip_secs": "clip", "grad_clip": "gc",
         "mlp_first_relu": "relu", "frame_init": "init", "precision": "", "qtype": "", "input": "", "norm": "norm",
         "zero_dc": "zerodc"}  # the few letters a run's name gives each flag (the rest: its own name)


def run_tag(parser, presets, argv, args):
    """The {tag} of a new run's name {model}_{tag}_{unixtime}: the preset, then what this command sets apart from
    it and the defaults (the model, the data, how it trains: 'fs2_dim128_nrnn1_bs16'), or 'default'. So the CPU
    example and the default model, both at frame size 2, are told apart by their names."""
    first = parser.parse_known_args(argv)[0]
    defaults = {a.dest: a.default for a in parser._actions}
    defaults.update(presets.get(first.preset, {}))
    parts = [first.preset] if first.preset else []
    for k, v in vars(args).items():
        if role(k) not in (MODEL, DATA, TRAINING) or v is None or v == defaults.get(k):
            continue
        if k == "data":
            v = os.path.splitext(os.path.basename(os.path.normpath(v)))[0]
            if v == os.path.basename(DEFAULT_DATA):
                continue
        value = {True: "", False: "no"}.get(v, v) if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else v
        parts.append(f"{SHORT.get(k, k)}{value}" if not isinstance(v, bool) else f"{value}{SHORT.get(k, k)}")
    tag = re.sub(r"[^\w.+=-]", "", "_".join(parts))[:60].strip("._") or "default"
    return tag


def check_same_run(args, resumed):
    """--run_dir naming an existing run: this command's flags, derived ones filled (build_model), must be the run's,
    but for those a session may change (RESUMABLE)."""
    saved = resumed.settings
    differ = [k for k in vars(args) if k not in RESUMABLE and k in saved and getattr(args, k) != saved[k]]
    if differ:
        k = differ[0]
        raise UserError(f"--{k} {getattr(args, k)} differs from the run in {resumed.run} ({saved[k]!r}): this "
                        f"command describes another run. To continue that run: python "
                        f"{script_of(resumed.model_id)} --resume {resumed.run}; to train these flags, give a new "
                        f"--run_dir")


def as_run_did(model_id, settings):
    """A run's saved flags as today's code reads them: renamed flags under their new names, dropped ones gone, and
    each flag the run lacks because it was made before the flag existed, with the value that run used."""
    settings = {RENAMED.get(k, k): v for k, v in settings.items() if k not in DROPPED}
    for flag, value in BEFORE_IT_EXISTED.items():
        if flag not in settings and model_id in FLAGS_OF.get(flag, {model_id}):
            settings[flag] = value
    return settings


BOUNDS = {"seed": 2 ** 32 - 1, "threads": 1024, "sample_secs": 3600.0, "n_samples": 1000}
BOUNDS_WHY = {"seed": "seeds are 32-bit", "threads": "more threads than any machine has cores crash OpenMP",
              "sample_secs": "each interval's samples are held in memory whole: an hour is 115 M samples at 8 kHz x 4",
              "n_samples": "that many WAV files every interval"}


def add_training_args(p, presets):
    g = p.add_argument_group("data and quantization")
    g.add_argument("--data", default=DEFAULT_DATA, help="folder made by python -m lib.prepare, or one audio file")
    g.add_argument("--clip_secs", type=float, default=8.0, help="clip length (seconds) when --data is one file")
    g.add_argument("--q_levels", type=int, default=256, help="quantization levels (even, 2..65536)")
    g.add_argument("--qtype", default="linear", choices=QTYPES, help="quantization type")
    g.add_argument("--zero_dc", action="store_true", help="subtract each clip's mean before quantizing")
    g.add_argument("--norm", default="none", choices=NORMS, help="'minmax': stretch each clip to [-1, 1] (original)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=128,
                   help="clips per batch (per process under torchrun: the global batch is N times this)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip each gradient element to [-c, c] (0 = off)")
    g.add_argument("--seed", type=int, default=123, help="seed of the init, the data order and the samples")
    g = p.add_argument_group("budget, cadence and runs")
    g.add_argument("--stop_time", type=float, default=12.0, help="stop after this much training time (hours)")
    g.add_argument("--stop_iters", type=int, default=0, help="stop after this many iterations (0 = no limit)")
    g.add_argument("--print_time", type=float, default=3600.0,
                   help="log, evaluate, checkpoint and sample every this much training time (seconds)")
    g.add_argument("--print_iters", type=int, default=0, help="... or every this many iterations (overrides "
                   "--print_time when > 0)")
    g.add_argument("--valid_clips", type=int, default=0, help="evaluate valid NLL on this many clips (0 = all)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop when valid NLL has not improved for this many intervals (0 = off: a run spends its "
                        "whole budget, and checkpoints/best.pt keeps the best weights anyway)")
    g.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep only the newest K interval checkpoints (and best.pt) (default: 0, keep every one)")
    g.add_argument("--n_samples", type=int, default=4, help="sequences generated at every interval")
    g.add_argument("--sample_secs", type=float, default=4.0, help="length of each generated sequence (seconds)")
    g.add_argument("--name", default=None, help="tag in the run name {model}_{tag}_{unixtime} (default from flags)")
    g.add_argument("--runs_dir", default="runs", help="folder that holds the run folders")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    g.add_argument("--run_dir", default=None, metavar="RUN_DIR",
                   help="the run folder, instead of --runs_dir/--name: the first command creates the run, the same "
                        "command again continues it (a requeued job, torchrun --max_restarts); other model or "
                        "training flags than the run's are refused")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    g.add_argument("--precision", default="tf32", choices=PRECISIONS,
                   help="matrix products on CUDA: fp32, tf32 (fp32 storage, TF32 tensor cores), or bf16 autocast "
                        "(weights, optimizer state and loss stay fp32); the CPU always computes in fp32")
    g.add_argument("--cuda_graph_step", action="store_true",
                   help="on CUDA, capture the training step as CUDA graphs and replay them (lib/cuda_graph.py); off "
                        "until measured and checked on a GPU (tests/test_cuda.py); not with torchrun")
    g.add_argument("--no_cuda_graph_step", dest="cuda_graph_step", action="store_false", default=argparse.SUPPRESS,
                   help="turn --cuda_graph_step off, e.g. to resume such a run where there is no CUDA (default: off)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads of torch; 0 = torch's default (one per core)")
    g.add_argument("--preset", default=None, choices=sorted(presets),
                   help="named set of defaults that flags given after it still override: " +
                   "; ".join(f"{name} = " + " ".join(f"--{k} {v}" for k, v in values.items())
                             for name, values in sorted(presets.items())))
    g.add_argument("--tensorboard", action="store_true",
                   help="also write each interval's NLLs, samples and spectrograms to RUN/tensorboard/ for TensorBoard "
                        "(needs the tensorboard package)")
    g.add_argument("--no_tensorboard", dest="tensorboard", action="store_false", default=argparse.SUPPRESS,
                   help="turn --tensorboard off, e.g. to resume such a run where tensorboard is not installed "
                        "(default: off)")
    g.add_argument("--dry_run", action="store_true", help="print the settings and parameter count, then exit")
    g.add_argument("--accept_changed_data", action="store_true",
                   help="with --resume: train on, although the data differs from what the run was trained on")


def build_parser(script, doc, add_model_args, presets):
    parser = ArgumentParser(prog=f"python {script}", description=doc)
    add_model_args(parser)
    add_training_args(parser, presets)
    return parser


def run_to_continue(parser, argv):
    """(the run folder this command continues, or None for a new run: --resume RUN, or --run_dir RUN once RUN holds
    a run (settings.json); the command line parsed alone). Read first, since a resumed run's flags come from it. A process that torchrun restarted
    (--max_restarts) must name its run: else every restart would begin a new one."""
    first = parser.parse_known_args(argv)[0]
    if first.resume and first.run_dir:
        raise UserError("--resume and --run_dir both name a run: give one of them")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not (first.resume or first.run_dir):
        raise UserError("torchrun restarted this process (--max_restarts), and without --run_dir it would begin a new "
                        "run: add --run_dir RUN to the command, so that a restart continues its run")
    if first.run_dir and is_run(first.run_dir):
        return first.run_dir, first
    return first.resume, first


def parse_settings(parser, presets, argv, resumed, first=None):
    """Resolved flags: defaults < preset < command line; with --resume (resumed: lib.checkpoint.Resumed), the
    run's flags < command line, and only the RESUMABLE ones may change. first: the command line parsed alone, when
    run_to_continue has parsed it."""
    first = first or parser.parse_known_args(argv)[0]
    # a flag added after a run was made takes its default (what the run did without it)
    saved = None if resumed is None else \
        {**{a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}, **resumed.settings}
    if resumed is None or first.resume is None:  # a new run, or --run_dir's: the command gives every flag
        if first.preset:
            parser.set_defaults(**presets[first.preset])
        args = parser.parse_args(argv)
        args.data = os.path.abspath(args.data)  # recorded so: the report and --resume find it from any folder
        return args
    args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))  # explicit flags override saved ones
    changed = [k for k in vars(args) if k not in RESUMABLE and getattr(args, k) != saved.get(k)]
    if changed:
        raise UserError(f"--{changed[0]} cannot change when resuming (the run has {saved.get(changed[0])!r}); "
                        f"only {', '.join('--' + k for k in sorted(RESUMABLE - {'resume'}))} can")
    args.data = os.path.abspath(args.data)
    args.accept_changed_data = first.accept_changed_data  # this session's word only: never carried to the next
    return args


def check_settings(args, device):
    """One line (UserError) for the first flag that is out of its range, or that this device cannot do."""
    check_q_levels(args.q_levels, args.qtype)
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number (got {value})")
    positive = {"batch_size": args.batch_size, "lr": args.lr, "stop_time": args.stop_time,
                "print_time": args.print_time, "clip_secs": args.clip_secs}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name} must be positive (got {value})")
    for name in ("stop_iters", "print_iters", "valid_clips", "n_samples", "grad_clip", "sample_secs", "threads",
                 "patience", "keep_checkpoints", "seed"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name, most in BOUNDS.items():
        if getattr(args, name) > most:
            raise UserError(f"--{name} {getattr(args, name)} is more than {most:,} ({BOUNDS_WHY[name]})")
    if args.name is not None and not re.fullmatch(r"[\w.+=-]+", args.name) or args.name in (".", ".."):
        raise UserError(f"--name {args.name!r}: use letters, digits and . _ + = - only (it becomes part of one folder's "
                        f"name under --runs_dir; no / or spaces)")
    no_cuda = device.type != "cuda"
    if args.precision == "bf16" and no_cuda:
        raise UserError("this run trains in bf16 (--precision), which is for CUDA: resume it where there is a GPU"
                        if args.resume else
                        "--precision bf16 is for CUDA; on the CPU use fp32 (the default tf32 means fp32 there)")
    if args.cuda_graph_step and no_cuda:
        raise UserError("--cuda_graph_step is for CUDA: no CUDA device here; " +
                        ("add --no_cuda_graph_step to resume without it" if args.resume else "leave it out"))
    if args.cuda_graph_step and dist.world_size() > 1:
        raise UserError("--cuda_graph_step does not work with torchrun yet: leave it out")


def choose_device(flag):
    """--device auto|cpu|cuda -> the torch device (auto: cuda when available); cuda where there is none is one
    line. Under torchrun, lib.dist.join picks this process's GPU."""
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device("cuda" if flag != "cpu" and torch.cuda.is_available() else "cpu")
