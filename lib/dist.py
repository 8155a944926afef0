"""Training on several processes with torchrun (DistributedDataParallel): one process per GPU, or per CPU for tests.

    torchrun --nproc_per_node 4 two_tier.py --frame_size 2          # 4 GPUs of one machine

Each iteration draws one global batch of world x --batch_size segments, the same on every rank (the data order is
a function of the seed and the iteration); rank r trains on rows r*B .. (r+1)*B - 1 of it. DDP averages the
gradients, so a step on N ranks of batch B is a step on one process of batch N*B over the same clips. Rank 0
alone evaluates, samples and writes the run folder; decisions made from clocks and signals (an interval's end
by time, the budget, Ctrl-C) are taken on rank 0's clock and signals, agreed at the loop's sync points, so that
every rank stops at the same iteration. A run resumes with the same number of processes.

In a single process every helper here does nothing (or returns what it was given), so that the training loop has
no branch for torchrun.
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist

from lib import UserError

# rank 0 evaluates and samples while the others wait in a collective: allow for a long evaluation
TIMEOUT = datetime.timedelta(hours=2)


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def join(device):
    """Under torchrun with more than one process: the process group (NCCL on CUDA, gloo on the CPU) -> this
    process's device (its local GPU). In a single process: `device` as it is."""
    if world_size() == 1:
        return device
    cuda = device.type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, **restart_store())
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def restart_store():
    """After torchrun restarted the workers (--max_restarts), a store of their own for this attempt. The store that
    torchrun's agent shares with its workers outlives a restart, and the process group's keys from the attempt
    before (each rank's address) are still in it: the new ranks would connect to the dead ones' ports (torch issue
    135712). Each attempt's keys under their own prefix avoid that; between nodes, where a node that did not fail
    counts no restart, the launch sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README) and this is not needed."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False,
                          timeout=TIMEOUT)
    return {"store": dist.PrefixStore(f"attempt_{attempt}/", agent), "rank": int(os.environ["RANK"]),
            "world_size": world_size()}


def same_everywhere(values):
    """A UserError on every rank unless each rank has the same `values` ({what: value}: the data's fingerprint, a
    digest of the code, the flags): nodes that would train on other data, code or flags stop at once, in one line
    each (one collective)."""
    if world_size() == 1:
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, values)
    for r, theirs in enumerate(every):
        differ = [k for k in values if theirs.get(k) != every[0].get(k)]
        if differ:
            raise UserError(f"rank {r} has other {differ[0]} ({theirs.get(differ[0])}) than rank 0 ({every[0].get(differ[0])}): "
                            f"every node must train on the same data, code and flags")


def initial_states(model):
    """The learned initial states h0: the only parameters that take part in some steps only (a clip's first
    chunk, on every rank alike)."""
    return [(name, p) for name, p in model.named_parameters() if name.split(".")[-1] == "h0"]


def wrap(model, device):
    """The model for training steps: DDP averages its gradients across ranks, but for the learned h0, which it
    leaves out (average_initial_state_grads does it at the steps that use them). With every parameter it holds
    used at every step, DDP need not search the autograd graph for unused ones (find_unused_parameters), which
    copies a map to the host at every step and so would make the step wait for the GPU. Without a process group (one process): the model itself."""
    if not dist.is_initialized():
        return model
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, [name for name, _ in initial_states(model)])
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)


def average_initial_state_grads(model):
    """At a clip's first chunk: h0's gradients averaged over ranks, as DDP averages the others (one collective
    each, queued on the device without waiting for it)."""
    for _, p in initial_states(model):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def from_rank0(obj):
    """rank 0's `obj` on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
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
    if world_size() == 1 or h is None:
        return h
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h.contiguous())
    return torch.cat(parts, dim=1)


def gather_values(values, device):
    """Every rank's list of floats, in rank order (one collective, float64: exact for float32 sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def mean(values, device):
    """A list of floats averaged over ranks (one collective)."""
    if world_size() == 1:
        return values
    return [v / world_size() for v in agree(values, device)]


def decide(sync, train_secs, interval_secs, signum, finite, device):
    """What every rank acts on after a step -> (train_secs, interval_secs, signum, finite, agreed). One process
    acts on its own clocks and signal at every step. Under torchrun the ranks agree at sync points only: rank 0's
    clocks, any rank's signal or non-finite loss (one collective); between them a rank acts on no clock and no
    signal (agreed False), so that every rank stops at the same iteration."""
    if world_size() == 1:
        return train_secs, interval_secs, signum, finite, True
    if not sync:
        return train_secs, interval_secs, None, finite, False
    main = rank() == 0
    train_secs, interval_secs, signum, bad = agree([train_secs if main else -1, interval_secs if main else -1,
                                                    signum or 0, 0 if finite else 1], device, "max")
    return train_secs, interval_secs, int(signum) or None, not bad, True


LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words for a peer gone


def lost_process(error):
    """Under torchrun, when `error` (raised by a collective) says another process is gone: which, in words, and
    gloo's reason (e.g. 'rank 1 of this run's 2 processes was lost (Connection closed by peer [127.0.0.1]:45787)');
    else None."""
    if world_size() == 1 or not (isinstance(error, dist.DistError) or any(w in str(error) for w in LOST)):
        return None
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    why = first.split("] ", 1)[-1].split(". ", 1)[0]  # without the C++ file and line, and the advice after
    who = f"rank {1 - rank()} of this run's 2 processes" if world_size() == 2 else \
        f"another of this run's {world_size()} processes"
    return f"{who} was lost ({why})"


def cleanup():
    """End the process group now, while the interpreter is whole, whatever way the run ended (the entry point
    calls this last, once no exception holds the training's objects).

    Why it matters: DistributedDataParallel sits in a reference cycle, so only the cyclic garbage collector frees
    it, and with it its reducer's hold on the process group. Left to chance, that happened during the
    interpreter's shutdown; the group's destructor then joined gloo's worker threads, one of them dropped the last
    reference to a tensor that Python still owned, took the GIL of a finalizing interpreter, and was ended with
    pthread_exit: a forced unwind through a noexcept C++ frame, std::terminate ("terminate called without an
    active exception"), SIGABRT. Under load, where a worker is late to drop its work, it came in one run of
    three. Collected here, the group's last reference goes in destroy_process_group."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
