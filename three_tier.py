"""Three-tier SampleRNN: a big-frame GRU conditions a frame GRU, which conditions the sample-level MLP (SampleRNN,
Mehri et al. 2017, the paper's best model on speech and music).

    python three_tier.py                              # the paper's speech setting: big frames of 8, frames of 2
    python three_tier.py --preset tiny                # a few seconds on a CPU
    python three_tier.py --resume runs/threetier_bfs8_fs2_1732540000

Time alignment, for a chunk x of BFS + SEQ_LEN samples (the first BFS from the previous chunk; R = BFS / FS):
- big frame b = x[b*BFS : (b+1)*BFS] is read by the big-frame GRU, whose output, projected to R vectors,
  conditions the R frames of the NEXT big frame;
- the frame GRU reads frame x[BFS + k*FS - FS : BFS + k*FS] (the one just before frame k of the targets) plus
  the big tier's vector for frame k, and its output, projected to FS vectors, conditions frame k's samples;
- the MLP predicts x[BFS + t] from its conditioning vector and the FS samples x[BFS + t - FS : BFS + t].
So logits[:, t] predicts x[:, BFS + t] from x[:, :BFS + t] only; notes/three_tier.md draws it.
The two GRU stacks' hidden states travel as one tensor (2 * n_rnn, B, dim): the big tier's layers, then the
frame tier's. The tiers are two_tier.py's FrameLevelRNN and SampleLevelMLP.
"""
if __name__ == "__main__":  # before the slow imports: a Ctrl-C while they load is one line, not a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted while starting; nothing was saved")

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from lib import UserError
from lib.layers import gru_step, gru_weights, linear_t
from lib.quantize import q_zero, to_reals
from lib.sample import STEP_SAMPLES, array_module, as_arrays, draw, one_row_threads
from two_tier import FrameLevelRNN, SampleLevelMLP, add_departure_args, departures, first_floor, mlp_logits

MODEL_ID = "threetier"
PRESETS = {  # each preset holds only the values it changes
    "tiny": dict(big_frame_size=4, frame_size=2, seq_len=32, dim=32, n_rnn=1, emb_size=16, batch_size=8,
                 stop_iters=20, print_iters=10, valid_clips=2, n_samples=2, sample_secs=0.25),
}


class ThreeTier(nn.Module):
    def __init__(self, big_frame_size=8, frame_size=2, seq_len=512, dim=1024, n_rnn=1, emb_size=256, q_levels=256,
                 first_relu=True, frame_init="lecun"):
        super().__init__()
        self.big_frame_size, self.frame_size, self.n_rnn, self.q_levels = big_frame_size, frame_size, n_rnn, q_levels
        self.overlap, self.seq_len = big_frame_size, seq_len  # the chunk geometry the data loop uses
        self.big_rnn = FrameLevelRNN(big_frame_size, dim, n_rnn, q_levels, per_frame=big_frame_size // frame_size,
                                     init=frame_init)
        self.frame_rnn = FrameLevelRNN(frame_size, dim, n_rnn, q_levels, conditioned=True, init=frame_init)
        self.sample_mlp = SampleLevelMLP(frame_size, dim, emb_size, q_levels, first_relu)

    def forward(self, x, h=None):
        """x (B, BFS + T) int levels, T a multiple of BFS; h (2 * n_rnn, B, dim) or None for the learned h0s.
        -> logits (B, T, q_levels) where logits[:, t] predicts x[:, BFS + t] from x[:, :BFS + t]; h; aux = 0."""
        bfs, fs = self.big_frame_size, self.frame_size
        cond, h = self.frame_tiers(x, h)
        prev = x[:, bfs - fs:-1].unfold(1, fs, 1)  # (B, T, FS): prev[:, t] = x[:, BFS + t - FS : BFS + t]
        logits = self.sample_mlp(prev, cond)
        return logits, h, logits.new_zeros(())

    def frame_tiers(self, x, h=None):
        """The two GRU tiers over x as in forward -> (cond (B, T, dim) for the MLP, h)."""
        bfs, fs, n_rnn = self.big_frame_size, self.frame_size, self.n_rnn
        B, T = x.shape[0], x.shape[1] - bfs
        h_big, h_frame = (None, None) if h is None else (h[:n_rnn], h[n_rnn:])
        above, _, h_big = self.big_rnn(x[:, :-bfs].reshape(B, T // bfs, bfs), h_big)  # (B, T/FS, dim)
        frames = x[:, bfs - fs:bfs - fs + T].reshape(B, T // fs, fs)  # frame k: the one before target frame k
        cond, _, h_frame = self.frame_rnn(frames, h_frame, above)  # (B, T, dim)
        return cond, torch.cat([h_big, h_frame])

    def prime_state(self, n, prime=None):
        """State to sample from: (h, the last big frame read), for n sequences that start like a clip (BFS samples
        of q_zero, the learned h0s) or continue `prime` (1-D levels, cut to whole big frames at its start)."""
        bfs = self.big_frame_size
        pad = torch.full((n, bfs), q_zero(self.q_levels), dtype=torch.long, device=self.device)
        h = torch.cat([self.big_rnn.rnn.initial_state(n), self.frame_rnn.rnn.initial_state(n)])
        if prime is None or len(prime) < bfs:
            return h, pad
        # as a training chunk (the last big frame conditions nothing yet), on one row: the n rows are alike, and the
        # MLP's output is not needed (at batch 64 and a 2 s prime it would take gigabytes)
        x = torch.cat([pad[:1], prime[len(prime) % bfs:].to(self.device)[None]], dim=1)
        with one_row_threads():
            _, h = self.frame_tiers(x, h[:, :1])
        return h.expand(-1, n, -1).contiguous(), x[:, -bfs:].expand(n, -1).contiguous()

    @torch.no_grad()
    def generate(self, n, length, noise, temperature=1.0, prime=None, keep_logits=False):
        """Plain reference sampler -> (n, length) int levels [and the (n, length, q_levels) logits they were
        drawn from]. noise: lib.sample.GumbelNoise. The big-frame GRU steps once per big frame, the frame GRU once
        per frame, the MLP once per sample, all through the same modules as training."""
        bfs, fs, n_rnn = self.big_frame_size, self.frame_size, self.n_rnn
        n_big = -(-length // bfs)  # whole big frames, cut to `length` at the end
        h, last = self.prime_state(n, prime)
        h_big, h_frame = h[:n_rnn], h[n_rnn:]
        x = torch.cat([last, last.new_zeros(n, n_big * bfs)], dim=1)
        kept = []
        with parametrize.cached():  # weight norm computed once, not at every step
            for b in range(n_big):
                above, _, h_big = self.big_rnn(x[:, None, b * bfs:(b + 1) * bfs], h_big)  # (n, R, dim)
                for r in range(bfs // fs):
                    s = (b + 1) * bfs + r * fs  # the frame's first sample
                    cond, _, h_frame = self.frame_rnn(x[:, None, s - fs:s], h_frame, above[:, r:r + 1])
                    frame_noise = noise.take(fs)
                    for j in range(fs):
                        logits = self.sample_mlp(x[:, None, s + j - fs:s + j], cond[:, j:j + 1])[:, 0]
                        kept += [logits] if keep_logits else []
                        x[:, s + j] = draw(logits, frame_noise[:, j], temperature)
        x = x[:, bfs:bfs + length]
        return (x, torch.stack(kept, dim=1)[:, :length]) if keep_logits else x

    def fast_sampler(self, n, temperature=1.0, prime=None, record=False, backend="torch"):
        return FastThreeTierSampler(self, n, temperature, prime, record, backend)

    @property
    def device(self):
        return self.big_rnn.rnn.h0.device


class FastThreeTierSampler:
    """The fast path of ThreeTier.generate, whole big frames (about STEP_SAMPLES samples) per step() call: weight
    norm folded once, the MLP's first layer as tables (two_tier.py's FastTwoTierSampler says how), all state in
    preallocated tensors updated in place, no host-device sync (CUDA-graph capturable); one step() for numpy and
    torch (xp is the module it calls)."""

    def __init__(self, model, n, temperature, prime, record, backend):
        bfs, fs, q = model.big_frame_size, model.frame_size, model.q_levels
        xp = array_module(backend)
        self.step_len = bfs * -(-STEP_SAMPLES // bfs)
        self.bfs, self.fs, self.n_rnn, self.temperature, self.record = bfs, fs, model.n_rnn, temperature, record
        self.xp, self.backend = xp, backend
        with torch.no_grad(), parametrize.cached():
            big, frame, mlp = model.big_rnn, model.frame_rnn, model.sample_mlp
            w = mlp.inp.weight.detach()
            offsets = torch.arange(fs, device=w.device) * q  # row of window position j in the table
            reals = to_reals(torch.arange(q, device=w.device), q).to(w.dtype)  # level -> GRU input
            self.weights = as_arrays((reals, gru_weights(big.rnn.gru), linear_t(big.to_cond), linear_t(frame.inp),
                                      gru_weights(frame.rnn.gru), linear_t(frame.to_cond), mlp.tables(), offsets,
                                      [linear_t(layer) for layer in mlp.hidden], linear_t(mlp.out)), xp) + \
                (first_floor(mlp),)
            h, last = model.prime_state(n, prime)
        self.h = h.clone()  # (2 * n_rnn, n, dim)
        self.window = torch.cat([last, last.new_zeros(n, bfs)], dim=1)  # last big frame read, then the new one
        self.frames = last.new_zeros(n, self.step_len)  # what step() returns
        self.recorded = torch.zeros(self.step_len, q, device=w.device, dtype=w.dtype) if record else None
        self.close = lambda: None  # stops the compiled step's threads (generate() calls it)
        if backend == "numba":  # the same step compiled, on torch's threads (lib/kernels.py)
            from lib.teams import start_team, threetier_team
            self.team, self.window = start_team(threetier_team, self.weights, self.window, self.frames, self.h,
                                                temperature, self.recorded, self.step_len)
            self.close = weakref.finalize(self, self.team.close)  # also when the sampler is dropped unclosed
        self.arrays = as_arrays((self.h, self.window, self.frames, self.recorded), xp)  # numpy views on the CPU

    def step(self, noise):
        """noise (n, step_len, q_levels) -> the next step_len samples (n, step_len) of levels (an xp array,
        a view of the state); advances h and the window in place."""
        bfs, frames = self.bfs, self.arrays[2]
        if self.backend == "numba":
            self.team.step(noise)
            return frames
        for b in range(self.step_len // bfs):
            frames[:, b * bfs:(b + 1) * bfs] = self.big_frame_step(noise[:, b * bfs:(b + 1) * bfs], b * bfs)
        return frames

    def big_frame_step(self, noise, t):
        """noise (n, BFS, q_levels) -> the next big frame (n, BFS), whose logits are recorded from row t on."""
        xp, bfs, fs, n_rnn = self.xp, self.bfs, self.fs, self.n_rnn
        h, win, _, recorded = self.arrays
        reals, big_gru, (above_w, above_b), (in_w, in_b), frame_gru, (cond_w, cond_b), table, offsets, hidden, \
            out, floor = self.weights
        x = gru_step(reals[win[:, :bfs]], h[:n_rnn], big_gru, xp)
        above = (x @ above_w + above_b).reshape(x.shape[0], bfs // fs, -1)  # (n, R, dim)
        for r in range(bfs // fs):
            s = bfs + r * fs  # the frame's first sample in the window
            y = gru_step(reals[win[:, s - fs:s]] @ in_w + in_b + above[:, r], h[n_rnn:], frame_gru, xp)
            cond = (y @ cond_w + cond_b).reshape(y.shape[0], fs, -1)  # (n, FS, dim)
            for j in range(fs):
                logits = mlp_logits(win[:, s + j - fs:s + j], cond[:, j], table, offsets, hidden, out, floor)
                if self.record:
                    recorded[t + r * fs + j] = logits[0]
                win[:, s + j] = draw(logits, noise[:, r * fs + j], self.temperature)
        win[:, :bfs] = win[:, bfs:]
        return win[:, bfs:]

    def state_copy(self):
        return self.h.clone(), self.window.clone()

    def state_restore(self, state):
        self.h.copy_(state[0])
        self.window.copy_(state[1])


def add_model_args(p):
    p.add_argument("--big_frame_size", type=int, default=8, help="samples per frame of the big-frame GRU (BFS)")
    p.add_argument("--frame_size", type=int, default=2, help="samples per frame of the frame GRU (FS)")
    p.add_argument("--seq_len", type=int, default=512, help="samples per truncated-BPTT chunk (a multiple of BFS)")
    p.add_argument("--dim", type=int, default=1024, help="width of both GRU stacks and of the MLP")
    p.add_argument("--n_rnn", type=int, default=1, help="stacked GRUs in each of the two frame tiers")
    p.add_argument("--emb_size", type=int, default=256, help="embedding size of each previous sample in the MLP")
    add_departure_args(p)


def build_model(args):
    """The model from resolved settings, after checking them."""
    for name in ("big_frame_size", "frame_size", "seq_len", "dim", "n_rnn", "emb_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.big_frame_size % args.frame_size:
        raise UserError(f"--big_frame_size {args.big_frame_size} must be a multiple of --frame_size "
                        f"{args.frame_size}")
    if args.seq_len % args.big_frame_size:
        raise UserError(f"--seq_len {args.seq_len} must be a multiple of --big_frame_size {args.big_frame_size}")
    return ThreeTier(args.big_frame_size, args.frame_size, args.seq_len, args.dim, args.n_rnn, args.emb_size,
                     args.q_levels, *departures(args))



def main(argv=None):
    from lib.train import train_main  # here, not above: importing the model loads no training code
    train_main(MODEL_ID, __doc__, add_model_args, build_model, PRESETS, argv)


if __name__ == "__main__":
    main()
