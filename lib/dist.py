"""Training on several processes with torchrun (DistributedDataParallel): one process per GPU, or per CPU for tests.

    torchrun --nproc_per_node 4 two_tier.py --frame_size 2          # 4 GPUs of one machine

Each iteration draws one global batch of world x --batch_size segments, the same on every rank (the data order is
a function of the seed and the iteration); rank r trains on rows r*B .. (r+1)*B - 1 of it. DDP averages the
gradients, so a step on N ranks of batch B is a step on one process of batch N*B over the same clips. Rank 0
alone evaluates, samples and writes the run folder; decisions made from clocks and signals (an interval's end
by time, the budget, Ctrl-C) are taken on rank 0's clock and signals, agreed at the loop's sync points, so that
every rank stops at the same iteration. A run resumes with the same number of processes.
"""
import datetime
import os

import torch
import torch.distributed as dist

# rank 0 evaluates and samples while the others wait in a collective: allow for a long evaluation
TIMEOUT = datetime.timedelta(hours=2)


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def setup(device_flag):
    """Under torchrun with more than one process: the process group (NCCL on CUDA, gloo on the CPU) -> device.
    Otherwise None (a single process chooses its device as usual)."""
    if world_size() == 1:
        return None
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def wrap(model, device):
    """The model for training steps: DDP averages its gradients across ranks. find_unused_parameters: the learned
    h0 takes part only in a clip's first chunk; on the others it gets no gradient on any rank, and stays without
    one (Adam skips it), as in a single process. (DDP warns once, at the first chunk, that every parameter was used.)"""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def share(obj):
    """rank 0's `obj` on every rank (any picklable object)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(values, device, op="sum"):
    """A list of floats, summed ("sum") or maximized ("max") over ranks, in float64: one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def gather_rows(h):
    """The ranks' hidden states (n_rnn, B, dim), in rank order along the batch: (n_rnn, world*B, dim)."""
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h.contiguous())
    return torch.cat(parts, dim=1)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
