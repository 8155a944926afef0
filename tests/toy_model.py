"""A model defined only under tests/: one GRU over embedded samples, its flags, its sampler. It shows that a model
file is all a new model takes: it trains, resumes, reports and samples through lib's loop, run folder, report and
generate.py, with nothing in lib/ naming it (tests/test_toy_model.py)."""
import torch
from torch import nn

from lib.layers import GRUStack
from lib.quantize import q_zero
from lib.sample import STEP_SAMPLES, draw

MODEL_ID = "toy"
PRESETS = {}


class Toy(nn.Module):
    fast_backends = ("torch",)  # no compiled step of its own

    def __init__(self, dim, q_levels, seq_len):
        super().__init__()
        self.overlap, self.seq_len, self.q_levels = 1, seq_len, q_levels
        self.embed = nn.Embedding(q_levels, dim)
        self.rnn = GRUStack(dim, dim, 1)
        self.out = nn.Linear(dim, q_levels)

    def forward(self, x, h=None):
        """x (B, 1 + T) levels -> logits (B, T, Q) where logits[:, t] predicts x[:, 1 + t]; h; aux = 0."""
        out, h = self.rnn(self.embed(x[:, :-1]), h)
        logits = self.out(out)
        return logits, h, logits.new_zeros(())

    @torch.no_grad()
    def generate(self, n, length, noise, temperature=1.0, prime=None, keep_logits=False):
        sampler = ToySampler(self, n, temperature)
        return torch.cat([sampler.step(noise.take(1))[:, :1] for _ in range(length)], dim=1)

    def fast_sampler(self, n, temperature=1.0, prime=None, record=False, backend="torch"):
        return ToySampler(self, n, temperature)


class ToySampler:
    step_len = STEP_SAMPLES

    def __init__(self, model, n, temperature):
        self.model, self.temperature = model, temperature
        self.h = model.rnn.initial_state(n).clone()
        self.last = torch.full((n,), q_zero(model.q_levels), dtype=torch.long, device=self.h.device)
        self.frame = self.last.new_zeros(n, self.step_len)
        self.recorded = None

    def step(self, noise):
        noise = torch.as_tensor(noise)
        for t in range(self.step_len if noise.shape[1] == self.step_len else 1):
            out, self.h = self.model.rnn(self.model.embed(self.last)[:, None], self.h)
            self.last = draw(self.model.out(out[:, 0]), noise[:, t], self.temperature)
            self.frame[:, t] = self.last
        return self.frame

    def close(self):
        pass

    def state_copy(self):
        return self.h.clone(), self.last.clone()

    def state_restore(self, state):
        self.h, self.last = state[0].clone(), state[1].clone()


def add_model_args(p):
    p.add_argument("--dim", type=int, default=16, help="width of the GRU and of the embedding")
    p.add_argument("--seq_len", type=int, default=32, help="samples per truncated-BPTT chunk")


def build_model(args):
    return Toy(args.dim, args.q_levels, args.seq_len)


def main(argv=None):
    from lib.train import train_main
    train_main(MODEL_ID, __doc__, add_model_args, build_model, PRESETS, argv)
