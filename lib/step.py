"""The objective and one update: the loss of a chunk, its gradients, the Adam step, the evaluation NLL, and the
precision they run in. Every model, the training loop, the CUDA-graph step and the benchmarks call these.

A model answers `model(x, h) -> (logits, h, aux)` on a (B, overlap + seq_len) chunk of int levels, where
logits[:, t] predicts x[:, overlap + t]; it has attributes `overlap`, `seq_len`, `q_levels`."""
import math

import torch
import torch.nn.functional as F

from lib import Interrupted, dist

LN2 = math.log(2)
EVAL_CHUNK = 2048  # samples per evaluation chunk (rounded to whole training chunks)


def set_precision(precision):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"


def make_optimizer(model, lr, capturable=False):
    """Adam, fused into one kernel per step (on the CPU too: it gives the same results run after run);
    capturable (its step counts on the GPU) for a CUDA graph."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def train_step(model, optimizer, chunk, reset, h, grad_clip, precision="tf32", net=None):
    """One truncated-BPTT step on a chunk -> (train NLL in bits per sample, grad norm before clipping, h), the
    first two as float64 tensors on the device: reading them would wait for it, so the loop reads their sums
    only now and then. At the first chunk of a clip (reset) the model starts from its learned h0, whatever h was.
    bf16 autocasts the forward pass; the loss, gradients and Adam stay fp32. net: what computes the forward pass,
    when not the model itself (its DistributedDataParallel wrapper under torchrun)."""
    if reset:
        h = None
    # no cast cache: each weight is used once per forward, and a CUDA graph's capture needs it off
    with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        nll, aux, h = chunk_loss(model, chunk, h, net)
    optimizer.zero_grad(set_to_none=True)
    (nll + aux).backward()
    if reset and net is not None and net is not model:  # under torchrun: DDP leaves h0 to us
        dist.average_initial_state_grads(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return nll.detach().double() / LN2, grad_norm.detach().double(), h.detach().float()


def chunk_loss(model, chunk, h, net=None):
    """(mean NLL in nats, auxiliary loss, h) of one chunk."""
    logits, h, aux = (net or model)(chunk, h)
    targets = chunk[:, model.overlap:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)), aux, h


def to_device(chunk, device):
    """A batch to the device; on CUDA from pinned memory, so that the copy does not wait for the queued steps."""
    if device.type == "cuda" and not chunk.is_cuda:
        chunk = chunk.pin_memory()
    return chunk.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, split, batch_size, device, max_clips=0, stop=None):
    """Mean NLL in bits per sample over every predicted sample of the clips (all chunks, in a fixed order).
    stop: a threading.Event checked before each chunk; when it is set, Interrupted is raised."""
    from lib.data import eval_chunks  # here: generate.py uses this module's set_precision, not the data modules
    model.eval()
    total, count, h = 0.0, 0, None
    # longer chunks than in training give the same predictions (h is carried), with fewer calls
    eval_len = model.seq_len * max(1, EVAL_CHUNK // model.seq_len)
    for chunk, reset in eval_chunks(split, batch_size, model.seq_len, model.overlap, model.q_levels, eval_len,
                                    max_clips):
        if stop is not None and stop.is_set():
            raise Interrupted(saved=False)
        if reset:
            h = None
        chunk = chunk.to(device)
        logits, h, _ = model(chunk, h)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, model.overlap:].reshape(-1),
                                 reduction="sum").item()
        count += logits.shape[0] * logits.shape[1]
    return total / count / LN2


class NonFinite(Exception):
    """Training produced a non-finite value; nothing from it was saved."""


def non_finite(model, values):
    """Names of what is not finite: 'parameters' and the keys of `values` ({name: float})."""
    bad = [] if all(torch.isfinite(p).all() for p in model.parameters()) else ["parameters"]
    return bad + [name for name, v in values.items() if not math.isfinite(v)]
