"""Flat baseline: a sample-level GRU language model.

    python baseline.py                                # 3 x 512 GRU, reals in, chunks of 128 samples
    python baseline.py --input embed --seq_len 64
    python baseline.py --preset tiny

n_rnn stacked GRUs read one sample per step (as a real in [-2, 2], or a learned embedding) and a linear
layer predicts the next sample. For a chunk x of 1 + seq_len samples (the first from the previous chunk),
logits[:, t] predicts x[:, 1 + t] from x[:, :1 + t] only. Everything but the model is shared with
two_tier.py through lib/train.py.
"""
if __name__ == "__main__":  # before the slow imports: a Ctrl-C while they load is one line, not a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted while starting; nothing was saved")

import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from lib import UserError
from lib.layers import GRUStack, gru_step, gru_weights, linear, linear_t
from lib.quantize import q_zero, to_reals
from lib.sample import STEP_SAMPLES, array_module, as_arrays, draw, one_row_threads

MODEL_ID = "baseline"
INPUTS = ("reals", "embed")
PRESETS = {
    "tiny": dict(seq_len=32, dim=32, n_rnn=1, emb_size=16, batch_size=8, stop_iters=20, print_iters=10,
                 valid_clips=2, n_samples=2, sample_secs=0.25),
}


class FlatGRU(nn.Module):
    def __init__(self, dim=512, n_rnn=3, q_levels=256, input="reals", emb_size=256, seq_len=128):
        super().__init__()
        self.q_levels, self.input = q_levels, input
        self.overlap, self.seq_len = 1, seq_len  # the chunk geometry the data loop uses
        self.embed = nn.Embedding(q_levels, emb_size) if input == "embed" else None
        self.rnn = GRUStack(emb_size if input == "embed" else 1, dim, n_rnn)
        self.out = linear(dim, q_levels)

    def step_inputs(self, levels):
        """(B, T) int levels -> (B, T, n_in) GRU inputs."""
        if self.embed is not None:
            return self.embed(levels)
        return to_reals(levels, self.q_levels)[..., None].to(self.rnn.h0.dtype)

    def forward(self, x, h=None):
        """x (B, 1 + T) int levels; h (n_rnn, B, dim) or None for the learned h0.
        -> logits (B, T, q_levels) where logits[:, t] predicts x[:, 1 + t] from x[:, :1 + t]; h; aux = 0."""
        out, h = self.rnn(self.step_inputs(x[:, :-1]), h)  # (B, T, dim)
        logits = self.out(out)
        return logits, h, logits.new_zeros(())

    def prime_state(self, n, prime=None):
        """State to sample from: (h, the last sample read), for n sequences that start like a clip (one q_zero
        sample, the learned h0) or continue `prime` (1-D levels)."""
        device = self.rnn.h0.device
        x = torch.full((n, 1), q_zero(self.q_levels), dtype=torch.long, device=device)
        h = self.rnn.initial_state(n)
        if prime is not None and len(prime):  # on one row: the n rows are alike
            x = torch.cat([x[:1], prime.to(device)[None]], dim=1)
            with one_row_threads():
                _, h = self.rnn(self.step_inputs(x[:, :-1]), h[:, :1])
            h, x = h.expand(-1, n, -1).contiguous(), x[:, -1:].expand(n, -1).contiguous()
        return h, x[:, -1:]

    @torch.no_grad()
    def generate(self, n, length, noise, temperature=1.0, prime=None, keep_logits=False):
        """Plain reference sampler -> (n, length) int levels [and the (n, length, q_levels) logits they were
        drawn from]. noise: lib.sample.GumbelNoise. One GRU step per sample through the training modules."""
        h, last = self.prime_state(n, prime)
        x = torch.cat([last, last.new_zeros(n, length)], dim=1)
        kept = []
        with parametrize.cached():  # weight norm computed once, not at every step
            for t in range(1, 1 + length):
                out, h = self.rnn(self.step_inputs(x[:, t - 1:t]), h)
                logits = self.out(out[:, 0])  # (n, q_levels)
                kept += [logits] if keep_logits else []
                x[:, t] = draw(logits, noise.take(1)[:, 0], temperature)
        return (x[:, 1:], torch.stack(kept, dim=1)) if keep_logits else x[:, 1:]

    def fast_sampler(self, n, temperature=1.0, prime=None, record=False, backend="torch"):
        return FastFlatSampler(self, n, temperature, prime, record, backend)


class FastFlatSampler:
    """The fast path of FlatGRU.generate: `step_len` samples per step() call, weight norm folded once, the
    input a table lookup, state preallocated and updated in place, no host-device sync (CUDA-graph
    capturable); one step() for numpy and torch (xp is the module it calls), and the same step compiled for
    the CPU (backend "numba", lib/kernels.py)."""
    step_len = STEP_SAMPLES

    def __init__(self, model, n, temperature, prime, record, backend):
        xp = array_module(backend)
        self.temperature, self.record, self.xp, self.backend = temperature, record, xp, backend
        with torch.no_grad(), parametrize.cached():
            levels = torch.arange(model.q_levels, device=model.rnn.h0.device)
            inputs = model.step_inputs(levels[None])[0].to(model.rnn.h0.dtype)  # level -> GRU input
            self.weights = as_arrays((inputs, gru_weights(model.rnn.gru), linear_t(model.out)), xp)
            h, last = model.prime_state(n, prime)
        self.h, self.last = h.clone(), last.clone()  # (n_rnn, n, dim), (n, 1)
        self.frame = last.new_zeros(n, self.step_len)
        q, dtype = model.q_levels, model.rnn.h0.dtype
        self.recorded = torch.zeros(self.step_len, q, device=last.device, dtype=dtype) if record else None
        self.close = lambda: None  # stops the compiled step's threads (generate() calls it)
        if backend == "numba":  # the same step compiled, on torch's threads (lib/kernels.py)
            from lib.teams import flat_team
            lasts = self.last.expand(torch.get_num_threads(), -1, -1).clone()  # one per thread; 0's is the state
            self.last = lasts[0]
            self.team = flat_team(self.weights, lasts.numpy(), self.frame.numpy(), as_arrays(self.h, np), temperature,
                                  as_arrays(self.recorded, np), self.step_len)
            self.close = weakref.finalize(self, self.team.close)  # also when the sampler is dropped unclosed
        self.arrays = as_arrays((self.h, self.last, self.frame, self.recorded), xp)  # numpy views on the CPU

    def step(self, noise):
        """noise (n, step_len, q_levels) -> the next step_len samples (n, step_len), an xp array (a view
        of the state); advances the state."""
        h, last, frame, recorded = self.arrays
        if self.backend == "numba":
            self.team.step(noise)
            return frame
        inputs, gru, (out_w, out_b) = self.weights
        for t in range(self.step_len):
            x = gru_step(inputs[last[:, 0]], h, gru, self.xp)
            logits = x @ out_w
            logits += out_b
            if self.record:
                recorded[t] = logits[0]
            last[:, 0] = draw(logits, noise[:, t], self.temperature)
            frame[:, t] = last[:, 0]
        return frame

    def state_copy(self):
        return self.h.clone(), self.last.clone()

    def state_restore(self, state):
        self.h.copy_(state[0])
        self.last.copy_(state[1])


def add_model_args(p):
    p.add_argument("--input", default="reals", choices=INPUTS,
                   help="how a sample enters the GRU: a real in [-2, 2] or a learned embedding")
    p.add_argument("--seq_len", type=int, default=128, help="samples per truncated-BPTT chunk")
    p.add_argument("--dim", type=int, default=512, help="width of the GRUs")
    p.add_argument("--n_rnn", type=int, default=3, help="stacked GRUs")
    p.add_argument("--emb_size", type=int, default=256, help="embedding size with --input embed")


def build_model(args):
    for name in ("seq_len", "dim", "n_rnn", "emb_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return FlatGRU(args.dim, args.n_rnn, args.q_levels, args.input, args.emb_size, args.seq_len)



def main(argv=None):
    from lib.train import train_main  # here, not above: importing the model loads no training code
    train_main(MODEL_ID, __doc__, add_model_args, build_model, PRESETS, argv)


if __name__ == "__main__":
    main()
