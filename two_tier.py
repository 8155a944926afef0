"""Two-tier SampleRNN: a frame-level GRU conditions a sample-level MLP (SampleRNN, Mehri et al. 2017).

    python two_tier.py --frame_size 2                 # train on the default speech data
    python two_tier.py --preset tiny                  # a few seconds on a CPU
    python two_tier.py --resume runs/twotier_fs2_nf64_1732540000

Time alignment, for a chunk x of FS + SEQ_LEN samples (the first FS from the previous chunk):
frame f = x[f*FS : (f+1)*FS] is read by the frame-level RNN, whose output conditions the FS samples of the
NEXT frame; the MLP predicts x[FS + t] from its conditioning vector and the FS samples x[t : t + FS].
So logits[:, t] predicts x[:, FS + t] from x[:, :FS + t] only.
"""
if __name__ == "__main__":  # before the slow imports: a Ctrl-C while they load is one line, not a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted while starting; nothing was saved")

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lib import UserError
from lib.layers import GRUStack, gru_step, gru_weights, linear, linear_t
from lib.quantize import q_zero, to_reals
from lib.sample import STEP_SAMPLES, array_module, as_arrays, draw, one_row_threads

MODEL_ID = "twotier"
PRESETS = {  # each preset holds only the values it changes
    "tiny": dict(frame_size=2, n_frames=16, dim=32, n_rnn=1, emb_size=16, batch_size=8, stop_iters=20,
                 print_iters=10, valid_clips=2, n_samples=2, sample_secs=0.25),
}


class FrameLevelRNN(nn.Module):
    """GRU stack over frames of FS reals in [-2, 2]; one conditioning vector per sample of the next frame.
    (three_tier.py uses it for two tiers: `per_frame` vectors per frame for the tier below, and `conditioned`,
    where the frames enter through a linear map to dim plus the conditioning of the tier above.)"""

    def __init__(self, frame_size, dim, n_rnn, q_levels, per_frame=None, conditioned=False, init="lecun"):
        super().__init__()
        self.frame_size, self.dim, self.q_levels = frame_size, dim, q_levels
        self.inp = linear(frame_size, dim, init) if conditioned else None  # init: --frame_init
        self.rnn = GRUStack(dim if conditioned else frame_size, dim, n_rnn)
        self.to_cond = linear(dim, (per_frame or frame_size) * dim, init)

    def forward(self, frames, h, above=None):
        """frames (B, F, FS) int levels, h (n_rnn, B, dim) or None[, above (B, F, dim): the tier above's
        conditioning of each frame] -> cond (B, F*FS, dim): cond[:, f*FS + j] is for sample j of frame f+1;
        out (B, F, dim); h."""
        x = to_reals(frames, self.q_levels).to(self.rnn.h0.dtype)
        if self.inp is not None:
            x = self.inp(x) + above
        out, h = self.rnn(x, h)  # (B, F, dim)
        cond = self.to_cond(out).reshape(out.shape[0], -1, self.dim)  # (B, F*per_frame, dim)
        return cond, out, h


class SampleLevelMLP(nn.Module):
    """Predicts one sample from its conditioning vector and the FS samples just before it.

    Its first layer, Embedding then Linear(FS*emb -> dim), is for window position j a (q_levels, dim) table
    E @ W_j^T: each sample's first layer is then FS lookups and a sum. With `use_tables`, training computes the
    tables once per step, differentiably, instead of the product for every sample; the fast sampler always uses
    them. use_tables None (the default) means where `python bench.py train` measured it faster: on the CPU
    (notes/performance.md); on CUDA not yet measured, so off there."""

    def __init__(self, frame_size, dim, emb_size, q_levels, first_relu=True):
        super().__init__()
        self.frame_size, self.q_levels, self.first_relu = frame_size, q_levels, first_relu  # --mlp_first_relu
        self.embed = nn.Embedding(q_levels, emb_size)
        self.inp = linear(frame_size * emb_size, dim, init="he", bias=False)
        self.hidden = nn.ModuleList([linear(dim, dim, init="he") for _ in range(2)])
        self.out = linear(dim, q_levels)
        self.use_tables = None

    def tables(self):
        """(FS * q_levels, dim): row j * q_levels + v is level v at window position j, E[v] @ W_j^T."""
        emb, w = self.embed.weight.shape[1], self.inp.weight  # w (dim, FS*emb)
        return torch.cat([self.embed.weight @ w[:, j * emb:(j + 1) * emb].t() for j in range(self.frame_size)])

    def first_layer(self, prev):
        """prev (B, T, FS) int levels -> (B, T, dim), the first layer before its conditioning and ReLU."""
        if not (self.use_tables if self.use_tables is not None else prev.device.type == "cpu"):
            return self.inp(self.embed(prev).flatten(2))
        offsets = torch.arange(self.frame_size, device=prev.device) * self.q_levels  # table row of position j
        rows = (prev + offsets).reshape(-1, self.frame_size)
        return F.embedding_bag(rows, self.tables(), mode="sum").view(*prev.shape[:2], -1)

    def forward(self, prev, cond):
        """prev (B, T, FS) int levels, cond (B, T, dim) -> logits (B, T, q_levels)."""
        x = self.first_layer(prev) + cond
        x = F.relu(x) if self.first_relu else x
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class TwoTier(nn.Module):
    def __init__(self, frame_size=4, n_frames=64, dim=1024, n_rnn=3, emb_size=256, q_levels=256, ipcost=0.0,
                 first_relu=True, frame_init="lecun"):
        super().__init__()
        self.frame_size, self.q_levels, self.ipcost = frame_size, q_levels, ipcost
        self.overlap, self.seq_len = frame_size, n_frames * frame_size  # the chunk geometry the data loop uses
        self.frame_rnn = FrameLevelRNN(frame_size, dim, n_rnn, q_levels, init=frame_init)
        self.sample_mlp = SampleLevelMLP(frame_size, dim, emb_size, q_levels, first_relu)
        # auxiliary head (--ipcost): the frame-level output alone predicts each sample of the next frame
        self.ip_head = linear(dim, frame_size * q_levels) if ipcost > 0 else None

    def forward(self, x, h=None):
        """x (B, FS + T) int levels, T a multiple of FS; h (n_rnn, B, dim) or None for the learned h0.
        -> logits (B, T, q_levels) where logits[:, t] predicts x[:, FS + t] from x[:, :FS + t];
           h after the chunk; aux = ipcost-weighted auxiliary NLL in nats (0 without --ipcost)."""
        fs = self.frame_size
        B, T = x.shape[0], x.shape[1] - fs
        cond, out, h = self.frame_rnn(x[:, :-fs].reshape(B, T // fs, fs), h)  # frames of the inputs
        prev = x[:, :-1].unfold(1, fs, 1)  # (B, T, FS): prev[:, t] = x[:, t : t + FS]
        logits = self.sample_mlp(prev, cond)
        aux = logits.new_zeros(())
        if self.ip_head is not None:
            ip_logits = self.ip_head(out).reshape(B, T, self.q_levels)
            aux = self.ipcost * F.cross_entropy(ip_logits.reshape(-1, self.q_levels), x[:, fs:].reshape(-1))
        return logits, h, aux

    def prime_state(self, n, prime=None):
        """State to sample from: (h, the last frame read), for n sequences that start like a clip (FS samples
        of q_zero, the learned h0) or continue `prime` (1-D levels, cut to whole frames at its start)."""
        fs = self.frame_size
        pad = torch.full((n, fs), q_zero(self.q_levels), dtype=torch.long, device=self.device)
        h = self.frame_rnn.rnn.initial_state(n)
        if prime is None or len(prime) < fs:
            return h, pad
        # as a training chunk (the frames before the last condition nothing), on one row: the n rows are alike
        x = torch.cat([pad[:1], prime[len(prime) % fs:].to(self.device)[None]], dim=1)
        with one_row_threads():
            _, _, h = self.frame_rnn(x[:, :-fs].reshape(1, -1, fs), h[:, :1])
        return h.expand(-1, n, -1).contiguous(), x[:, -fs:].expand(n, -1).contiguous()

    @torch.no_grad()
    def generate(self, n, length, noise, temperature=1.0, prime=None, keep_logits=False):
        """Plain reference sampler -> (n, length) int levels [and the (n, length, q_levels) logits they were
        drawn from]. noise: lib.sample.GumbelNoise. The frame-level RNN steps once per frame, the MLP once per
        sample, both through the same modules as training."""
        fs = self.frame_size
        n_frames = -(-length // fs)  # whole frames, cut to `length` at the end
        h, last = self.prime_state(n, prime)
        x = torch.cat([last, last.new_zeros(n, n_frames * fs)], dim=1)
        kept = []
        with parametrize.cached():  # weight norm computed once, not at every step
            for f in range(n_frames):
                cond, _, h = self.frame_rnn(x[:, None, f * fs:(f + 1) * fs], h)  # (n, FS, dim): next frame's
                frame_noise = noise.take(fs)
                for j in range(fs):
                    t = (f + 1) * fs + j
                    logits = self.sample_mlp(x[:, None, t - fs:t], cond[:, j:j + 1])[:, 0]  # (n, q_levels)
                    kept += [logits] if keep_logits else []
                    x[:, t] = draw(logits, frame_noise[:, j], temperature)
        x = x[:, fs:fs + length]
        return (x, torch.stack(kept, dim=1)[:, :length]) if keep_logits else x

    def fast_sampler(self, n, temperature=1.0, prime=None, record=False, backend="torch"):
        return FastTwoTierSampler(self, n, temperature, prime, record, backend)

    @property
    def device(self):
        return self.frame_rnn.rnn.h0.device


class FastTwoTierSampler:
    """The fast path of TwoTier.generate, step_len samples (whole frames, about STEP_SAMPLES) per step() call,
    with
    - the MLP's first layer as a table: Embedding then Linear(FS*emb -> dim) is, per window position j, a
      (q_levels, dim) table E @ W_j^T, so each sample's first layer is a lookup and a sum;
    - weight norm folded into plain transposed weights once, the frame-level GRU stepped once per frame;
    - all state in preallocated tensors updated in place, no host-device sync (CUDA-graph capturable);
    - one step() for numpy and torch (xp is the module it calls), and the same step compiled for the CPU
      (backend "numba", lib/kernels.py); lib/sample.py says which runs where."""

    def __init__(self, model, n, temperature, prime, record, backend):
        fs, q = model.frame_size, model.q_levels
        xp = array_module(backend)
        self.step_len = fs * -(-STEP_SAMPLES // fs)
        self.fs, self.temperature, self.record = fs, temperature, record
        self.xp, self.backend = xp, backend
        with torch.no_grad(), parametrize.cached():
            mlp = model.sample_mlp
            w = mlp.inp.weight.detach()  # (dim, FS*emb)
            table = mlp.tables()
            offsets = torch.arange(fs, device=w.device) * q  # row of window position j in the table
            reals = to_reals(torch.arange(q, device=w.device), q).to(w.dtype)  # level -> frame-level input
            frame_rnn = model.frame_rnn
            self.weights = as_arrays((reals, gru_weights(frame_rnn.rnn.gru), linear_t(frame_rnn.to_cond), table,
                                      offsets, [linear_t(layer) for layer in mlp.hidden], linear_t(mlp.out)), xp) + \
                (first_floor(mlp),)
            h, last = model.prime_state(n, prime)
        self.h = h.clone()  # (n_rnn, n, dim)
        self.window = torch.cat([last, last.new_zeros(n, fs)], dim=1)  # last frame read, then the new one
        self.frames = last.new_zeros(n, self.step_len)  # what step() returns
        self.recorded = torch.zeros(self.step_len, q, device=w.device, dtype=w.dtype) if record else None
        self.close = lambda: None  # stops the compiled step's threads (generate() calls it)
        if backend == "numba":  # the same step compiled, on torch's threads (lib/kernels.py)
            from lib.teams import start_team, twotier_team
            self.team, self.window = start_team(twotier_team, self.weights, self.window, self.frames, self.h,
                                                temperature, self.recorded, self.step_len)
            self.close = weakref.finalize(self, self.team.close)  # also when the sampler is dropped unclosed
        self.arrays = as_arrays((self.h, self.window, self.frames, self.recorded), xp)  # numpy views on the CPU

    def step(self, noise):
        """noise (n, step_len, q_levels) -> the next step_len samples (n, step_len) of levels (an xp array,
        a view of the state); advances h and the window in place."""
        fs, frames = self.fs, self.arrays[2]
        if self.backend == "numba":
            self.team.step(noise)
            return frames
        for f in range(self.step_len // fs):
            frames[:, f * fs:(f + 1) * fs] = self.frame_step(noise[:, f * fs:(f + 1) * fs], f * fs)
        return frames

    def frame_step(self, noise, t):
        """noise (n, FS, q_levels) -> the next frame (n, FS), whose logits are recorded from row t on."""
        xp, fs = self.xp, self.fs
        h, win, _, recorded = self.arrays
        reals, gru, (cond_w, cond_b), table, offsets, hidden, out, floor = self.weights
        x = gru_step(reals[win[:, :fs]], h, gru, xp)
        cond = (x @ cond_w + cond_b).reshape(x.shape[0], fs, -1)  # (n, FS, dim)
        for j in range(fs):
            logits = mlp_logits(win[:, j:j + fs], cond[:, j], table, offsets, hidden, out, floor)
            if self.record:
                recorded[t + j] = logits[0]
            win[:, fs + j] = draw(logits, noise[:, j], self.temperature)
        win[:, :fs] = win[:, fs:]
        return win[:, fs:]

    def state_copy(self):
        return self.h.clone(), self.window.clone()

    def state_restore(self, state):
        self.h.copy_(state[0])
        self.window.copy_(state[1])


def first_floor(mlp):
    """What the fast paths clip the MLP's first layer at: 0 (its ReLU), or -inf without it (--mlp_first_relu off)."""
    return 0.0 if mlp.first_relu else -math.inf


def mlp_logits(prev, cond, table, offsets, hidden, out, floor):
    """The sample-level MLP of a fast sampler, on numpy arrays or torch tensors: prev (n, FS) levels, cond (n, dim)
    -> logits (n, q_levels), the first layer as table lookups (SampleLevelMLP.tables), clipped at `floor`."""
    a = table[prev + offsets].sum(1)  # first layer, no bias
    a += cond
    a = a.clip(floor)
    for w_t, b in hidden:
        a = a @ w_t
        a += b
        a = a.clip(0)
    logits = a @ out[0]
    logits += out[1]
    return logits


def add_model_args(p):
    p.add_argument("--frame_size", type=int, default=4, help="samples per frame of the frame-level RNN (FS)")
    p.add_argument("--n_frames", type=int, default=64, help="frames per truncated-BPTT chunk")
    p.add_argument("--seq_len", type=int, default=None,
                   help="samples per chunk (SEQ_LEN); if given, overrides --n_frames = seq_len / frame_size")
    p.add_argument("--dim", type=int, default=1024, help="width of the GRUs and of the MLP")
    p.add_argument("--n_rnn", type=int, default=3, help="stacked GRUs in the frame-level RNN")
    p.add_argument("--emb_size", type=int, default=256, help="embedding size of each previous sample in the MLP")
    p.add_argument("--ipcost", type=float, default=0.0,
                   help="weight of the auxiliary next-frame prediction cost (0 = off); reported NLL excludes it")
    add_departure_args(p)


def add_departure_args(p):
    """Two places where the ICLR-2017 code differs (notes/two_tier.md), as flags to measure them."""
    p.add_argument("--mlp_first_relu", default="on", choices=("on", "off"),
                   help="a ReLU after the MLP's first layer (plus the conditioning); the ICLR-2017 release: off")
    p.add_argument("--frame_init", default="lecun", choices=("lecun", "he"),
                   help="initialization of the frame tiers' input and conditioning projections; the ICLR-2017 "
                        "release: he")


def build_model(args):
    """The model from resolved settings; checks and fills the derived ones (args.n_frames from --seq_len)."""
    for name in ("frame_size", "n_frames", "dim", "n_rnn", "emb_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.seq_len is not None:
        if args.seq_len < 1 or args.seq_len % args.frame_size:
            raise UserError(f"--seq_len {args.seq_len} must be a positive multiple of --frame_size {args.frame_size}")
        args.n_frames = args.seq_len // args.frame_size
    args.seq_len = args.n_frames * args.frame_size
    if args.ipcost < 0:
        raise UserError(f"--ipcost must be >= 0 (got {args.ipcost})")
    return TwoTier(args.frame_size, args.n_frames, args.dim, args.n_rnn, args.emb_size, args.q_levels, args.ipcost,
                   *departures(args))


def departures(args):
    """(first_relu, frame_init) from the flags; runs made before the flags did what their defaults do."""
    return getattr(args, "mlp_first_relu", "on") == "on", getattr(args, "frame_init", "lecun")



def main(argv=None):
    from lib.train import train_main  # here, not above: importing the model loads no training code
    train_main(MODEL_ID, __doc__, add_model_args, build_model, PRESETS, argv)


if __name__ == "__main__":
    main()
