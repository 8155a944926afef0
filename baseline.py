"""Flat baseline: a sample-level GRU language model (SPEC "Flat baseline").

    python baseline.py                                # 3 x 512 GRU, reals in, chunks of 128 samples
    python baseline.py --input embed --seq_len 64
    python baseline.py --preset tiny

n_rnn stacked GRUs read one sample per step (as a real in [-2, 2], or a learned embedding) and a linear
layer predicts the next sample. For a chunk x of 1 + seq_len samples (the first from the previous chunk),
logits[:, t] predicts x[:, 1 + t] from x[:, :1 + t] only. Everything but the model is shared with
two_tier.py through lib/train.py.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lib import UserError
from lib.layers import GRUStack, linear
from lib.quantize import q_zero, to_reals
from lib.train import train_main

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
        return self.embed(levels) if self.embed is not None else to_reals(levels, self.q_levels)[..., None]

    def forward(self, x, h=None):
        """x (B, 1 + T) int levels; h (n_rnn, B, dim) or None for the learned h0.
        -> logits (B, T, q_levels) where logits[:, t] predicts x[:, 1 + t] from x[:, :1 + t]; h; aux = 0."""
        out, h = self.rnn(self.step_inputs(x[:, :-1]), h)  # (B, T, dim)
        logits = self.out(out)
        return logits, h, logits.new_zeros(())

    @torch.no_grad()
    def generate(self, n, length, generator, temperature=1.0, keep_logits=False):
        """Plain reference sampler: (n, length) int levels (and their logits if keep_logits).
        Starts like a training clip: one sample of q_zero and the learned h0."""
        x = torch.full((n, 1 + length), q_zero(self.q_levels), dtype=torch.long, device=self.rnn.h0.device)
        kept = torch.zeros(n, length, self.q_levels, device=x.device) if keep_logits else None
        h = None
        with parametrize.cached():  # weight norm computed once, not at every step
            for t in range(1, 1 + length):
                out, h = self.rnn(self.step_inputs(x[:, t - 1:t]), h)
                logits = self.out(out[:, 0])  # (n, q_levels)
                if keep_logits:
                    kept[:, t - 1] = logits
                x[:, t] = torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1,
                                            generator=generator)[:, 0]
        return (x[:, 1:], kept) if keep_logits else x[:, 1:]


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


def default_tag(args):
    return f"{args.input}_seqlen{args.seq_len}"


def main(argv=None):
    train_main(MODEL_ID, __doc__, add_model_args, build_model, default_tag, PRESETS, argv)


if __name__ == "__main__":
    main()
