"""The training step (lib.step.train_step) captured as CUDA graphs and replayed: one launch per step instead of
hundreds of small kernels launched from Python. Shapes are static (the batch and the chunk never change), so two
graphs cover every step: one for a clip's first chunk (h from the learned h0) and one that carries h.

Why it gives the eager step's results: the warm-up steps that CUDA needs before a capture (lazy initialization,
kernel choices) are undone afterwards, in place, so training starts from the same weights and Adam state; the
capture itself runs nothing. Each graph computes its own gradients from zero (as zero_grad(set_to_none=True)
does), so in the graph that carries h the learned h0 has no gradient and Adam leaves it alone, as eagerly.
Adam is capturable (its step counts live on the GPU). tests/test_cuda.py compares 100 steps with the eager ones.
"""
import torch

from lib import UserError
from lib.step import train_step


class GraphedStep:
    """step(chunk, reset, h) -> (bits, grad_norm, h) like train_step, replaying a captured graph. The returned
    tensors are the graph's own: read (or add) them before the next step, as the loop does."""

    def __init__(self, model, optimizer, example_chunk, grad_clip, precision, warmup=3):
        self.chunk = example_chunk.clone()
        before = snapshot(model, optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, outside any graph: its updates are undone below
            h = None
            for i in range(warmup):
                _, _, h = train_step(model, optimizer, self.chunk, i == 0, h, grad_clip, precision)
        torch.cuda.current_stream().wait_stream(side)
        self.h = h.clone()  # the carried state: both graphs write their new h here
        self.graphs = {}
        for reset in (True, False):
            graph = torch.cuda.CUDAGraph()
            # each graph its own memory pool, and so its own gradients; thread_local: other threads may use CUDA
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                bits, grad_norm, h = train_step(model, optimizer, self.chunk, reset, self.h, grad_clip, precision)
                self.h.copy_(h)
            self.graphs[reset] = (graph, bits, grad_norm)
        put_back(model, optimizer, before)

    def __call__(self, chunk, reset, h):
        self.chunk.copy_(chunk, non_blocking=True)
        if h is not None and h is not self.h:  # a resumed run's h, or the first step's
            self.h.copy_(h)
        graph, bits, grad_norm = self.graphs[reset]
        graph.replay()
        return bits, grad_norm, self.h


def captured_at_first_call(model, optimizer, grad_clip, precision):
    """step(chunk, reset, h) like GraphedStep's, capturing it at the first call (whose chunk gives the shapes)."""
    graphed = None

    def step(chunk, reset, h):
        nonlocal graphed
        if graphed is None:
            try:
                graphed = GraphedStep(model, optimizer, chunk, grad_clip, precision)
            except RuntimeError as e:  # before the first step ends: nothing of the run has been written since
                why = str(e).strip().splitlines()[0][:200]
                raise UserError(f"--cuda_graph_step: the training step could not be captured as CUDA graphs here ({why}); "
                                f"train without it (resuming: --no_cuda_graph_step)") from e
        return graphed(chunk, reset, h)
    return step


def snapshot(model, optimizer):
    """Copies of the weights and of Adam's state (None where a parameter has no state yet)."""
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} if p in optimizer.state else None
             for p in model.parameters()]
    return params, state


def put_back(model, optimizer, saved):
    """Put back a snapshot in place (the graphs hold these tensors' addresses); state made since is zeroed, as
    a fresh Adam's would be."""
    params, state = saved
    with torch.no_grad():
        for p, old, old_state in zip(model.parameters(), params, state):
            p.copy_(old)
            for k, v in optimizer.state.get(p, {}).items():
                if old_state is None:
                    v.zero_()
                else:
                    v.copy_(old_state[k])
