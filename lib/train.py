"""The training loop every model shares: two_tier.py, three_tier.py and baseline.py call train_main with theirs.

One session: the run to continue, if any (lib/checkpoint.py), the flags (lib/settings.py), the model, the data,
the device and the run folder (lib/session.py), then the loop: draw a batch, step (lib/step.py), account; at an
interval's end measure and write (lib/interval.py); stop when the budget is spent or a signal asks
(lib/stopping.py). Under torchrun every rank runs this loop; lib/dist.py makes the ranks agree, and
does nothing in one process.

Faults cost at most one step: Ctrl-C or SIGTERM saves a checkpoint mid-interval and exits 130 / 143; a
checkpoint is written only from finite values; --resume skips a damaged newest checkpoint and repairs what a
kill left (metrics row, samples, temporary files); a failed write is one line naming the last checkpoint.
"""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback

import torch

from lib import MODELS, UserError, WriteError, checkpoint, dist, run
from lib.cli import check_torch, quiet_interrupts, script_of
from lib.cuda_graph import captured_at_first_call
from lib.interval import (continue_command, end_interval_on_every_rank, gathered, interrupted, new_interval,
                          patience_reached)
from lib.progress import Progress
from lib.session import begin, open_session
from lib.settings import (build_parser, check_same_run, check_settings, choose_device, parse_settings, run_tag,
                          run_to_continue)
from lib.step import to_device, train_step
from lib.stopping import Interrupts, NonFinite

SYNC_STEPS = 16  # on CUDA the step runs ahead of the host; every this many steps it waits and checks the loss


def train_main(model_id, doc, add_model_args, build_model, presets, argv=None):
    """Entry point of a model script: bad input is one line on stderr and exit status 2. The model's file names
    itself in lib.MODELS here (its runs record it), so a new model file needs no edit in lib/."""
    module = build_model.__module__
    if module == "__main__":  # run as python two_tier.py
        module = os.path.splitext(os.path.basename(sys.modules["__main__"].__file__))[0]
    MODELS.setdefault(model_id, module)
    parser = build_parser(script_of(model_id), doc, add_model_args, presets)
    threads = torch.get_num_threads()
    try:
        code = train(model_id, parser, build_model, presets, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the loop's own handlers (start-up), or a second Ctrl-C while saving
        print("\ninterrupted; nothing more was saved (no partial file is left)", file=sys.stderr)
        code = 130
    except Exception as e:  # out of memory: one line; else a bug: its traceback, then the same orderly end
        if not out_of_memory(e):
            traceback.print_exc()
            code = 1
        else:
            print(f"error: out of memory ({str(e).splitlines()[0][:160]}): these flags need more memory than this "
                  f"machine has; lower --batch_size, or the model's size (--dim, --n_rnn)", file=sys.stderr)
            code = 2
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests)
        run.release_runs()
    if getattr(signal.getsignal(signal.SIGTERM), "quiet", False):  # a script's process (not a test calling it)
        quiet_interrupts(None)  # it ended and said how: torchrun's SIGTERM to the ranks left adds no line
    dist.cleanup()  # here, with no exception (and its frames) holding the training's objects
    sys.exit(code)


def out_of_memory(e):
    """Whether `e` is an allocation that failed: numpy's and Python's MemoryError, torch's CPU allocator, CUDA's."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or \
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def train(model_id, parser, build_model, presets, argv):
    """The run to continue (checked: its model, its processes, its history), the flags, the model; then the
    session on its device and run folder, and the loop -> the exit status."""
    check_torch(torch.__version__)
    run_dir = run_to_continue(parser, argv)
    resumed = checkpoint.resume(run_dir, model_id, dist.world_size()) if run_dir else None
    args = parse_settings(parser, presets, argv, resumed)
    device = choose_device(args.device)
    check_settings(args, device)
    if args.run_dir is not None and resumed is None:  # before the data is read: a folder --run_dir may not take is one line now
        run.check_new_run_dir(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tag = args.name or run_tag(parser, presets, argv, args)  # from the flags as given, before derived ones fill in
    model = build_model(args)  # checks the model flags and fills derived ones
    if resumed and args.resume is None:  # --run_dir naming a run: its flags, derived ones included, must match
        check_same_run(args, resumed)
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        print(f"{model_id}: {n_params:,} parameters")
        return 0
    if args.tensorboard:  # before the run folder is made
        from lib.board import check_installed
        check_installed()
    device = dist.join(device)
    if resumed and dist.rank() == 0:
        run.hold_run(resumed.run_dir)  # before anything is repaired: one process trains a run at a time
    session = open_session(model_id, args, model, device, tag, resumed)
    session.command = shlex.join(["python", script_of(model_id)] + list(sys.argv[1:] if argv is None else argv))
    try:
        return train_session(session, n_params, resumed)
    except BaseException:  # a new run that could not start (out of memory, a signal, bad data): no folder is left
        if resumed is None and session.main:
            run.remove_unstarted(session.run_dir, folder_too=args.run_dir is None)
        raise


def train_session(session, n_params, resumed):
    """The session's run begun or restored, then the loop -> the exit status; a failed write, or a process lost
    under torchrun, is one line naming the last checkpoint."""
    warming = None
    try:
        state, h = begin(session, n_params, resumed)
        if session.main:  # the samplers' compile, beside the training (once per machine)
            warming = compile_samplers_beside(session)
        with Interrupts(second_aborts=dist.world_size() == 1, say=session.log) as interrupts:
            session.stop = interrupts.requested
            return loop(session, state, h, interrupts)
    except WriteError as e:
        print(f"error: {e}; {last_checkpoint(session.run_dir)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # under torchrun, a process killed or its node gone: one line, not gloo's traceback
        lost = dist.lost_process(e)
        if lost is None:
            raise
        saved = checkpoint.paths(session.run_dir)
        print(f"error: {lost}; {last_checkpoint(session.run_dir)}" +
              (f"; continue with: {continue_command(session)}" if saved else ""), file=sys.stderr)
        return 1
    finally:
        if warming is not None and warming.poll() is None:
            warming.kill()  # a run shorter than the compile: the next one compiles (nothing half-written is read)
            warming.wait()


def compile_samplers_beside(session):
    """Where a CPU run samples and a core is left over by the training's threads: a process on that core that
    compiles the samplers now if numba's cache lacks them (lib.sample.warm_up), so that the first samples need not
    wait for it. Without a core to spare it slowed the steps 5x and ended no sooner (notes/performance.md)."""
    threads, args = torch.get_num_threads(), session.args
    if session.device.type != "cpu" or not args.n_samples or (os.cpu_count() or 1) <= threads:
        return None
    return subprocess.Popen([sys.executable, "-c", WARM_UP, session.model_id, MODELS[session.model_id],
                             json.dumps(vars(args)), str(threads), str(args.n_samples)], cwd=run.REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


WARM_UP = """import importlib, sys
from lib.sample import warm_up
model_id, module, flags, threads, n = sys.argv[1:]
warm_up(model_id, importlib.import_module(module).build_model, flags, threads, n)
"""  # a process of the model's script: lib never imports one


def last_checkpoint(run_dir):
    saved = checkpoint.paths(run_dir)
    return f"the last checkpoint is {os.path.basename(saved[-1])}" if saved else "no checkpoint had been written"


def loop(session, state, h, interrupts):
    """Draw a batch, step, account; at the named points (interval due, budget spent, stop requested) do the named
    thing. -> the exit status."""
    args = session.args
    interval, due = interval_to_continue(state)
    if budget_spent(args, state) and not due:
        session.log(f"nothing to do: the run is at iteration {state['iteration']}, {state['train_secs'] / 3600:.3f} h "
                    f"(--stop_iters {args.stop_iters}, --stop_time {args.stop_time})")
        return 0
    wall_start, said_end = time.time() - state["wall_secs"], False
    progress = Progress(args, state, session.log, session.device, session.samples_per_step, shown=session.main)
    graphed = captured_at_first_call(session.model, session.optimizer, args.grad_clip, args.precision) \
        if args.cuda_graph_step else None  # the same step, replayed as CUDA graphs (lib/cuda_graph.py)
    session.model.train()
    try:
        while True:
            signum, agreed = None, True
            if not due:
                started = time.perf_counter()
                chunk, reset = session.batches(state["iteration"])  # the batch: a function of the iteration alone
                chunk = to_device(chunk, session.device)
                if graphed is None:  # forward, loss, backward, clip, Adam (lib/step.py)
                    bits, grad_norm, h = train_step(session.model, session.optimizer, chunk, reset, h,
                                                    args.grad_clip, args.precision, session.net)
                else:
                    bits, grad_norm, h = graphed(chunk, reset, h)
                signum, agreed = account(session, state, interval, bits, grad_norm, started, interrupts, progress)
                due = interval_due(args, state, interval, agreed)
            final = budget_spent(args, state, by_time=agreed)
            state["wall_secs"] = time.time() - wall_start
            if due or final:
                ended = time.time()
                final, code = end_interval_on_every_rank(session, state, interval, h, final, interrupts)
                if code is not None:
                    return code
                if not final and not said_end:
                    said_end = progress.say_end(state, time.time() - ended)
                interval, due = new_interval(), False
                session.model.train()
            if final:
                if session.main:
                    from lib.report import report  # here: training needs the report command for this line only
                    session.log("the run's row for experiments.md (python -m lib.report compares several):\n" +
                                report([session.run_dir]))
                return 0
            if signum is not None:
                return interrupted(session, state, *gathered(session, interval, h), signum)
    except NonFinite as e:
        saved = checkpoint.paths(session.run_dir)
        session.log(f"error: {e}; stopped without saving it. " +
                    (f"The last good checkpoint is {saved[-1]}" if saved else "No checkpoint had been saved yet."))
        return 1
    finally:
        progress.close()


def interval_to_continue(state):
    """(the interval's running sums, whether its end is still to do): from a checkpoint saved mid-interval (Ctrl-C),
    under torchrun each rank's own sums; else a new interval."""
    interval = state.pop("interval", None) or new_interval()
    if "ranks" in interval:
        interval["bits"], interval["grad_norm"] = interval.pop("ranks")[dist.rank()]
    return interval, state.pop("interval_due", False)


def budget_spent(args, state, by_time=True):
    """--stop_iters reached, --stop_time spent (when the clocks are agreed), or --patience run out."""
    return bool(args.stop_iters and state["iteration"] >= args.stop_iters) or \
        (by_time and state["train_secs"] >= args.stop_time * 3600) or patience_reached(args, state["since_best"])


def interval_due(args, state, interval, agreed):
    if args.print_iters:
        return state["iteration"] % args.print_iters == 0
    return agreed and interval["secs"] >= args.print_time


def account(session, state, interval, bits, grad_norm, started, interrupts, progress):
    """The step's sums kept on the device, its time counted -> (the signal that stops the run, whether the clocks
    were agreed at this step: always, in one process)."""
    interval["bits"] += bits  # device tensors: read once per SYNC_STEPS, not per step
    interval["grad_norm"] += grad_norm
    interval["steps"] += 1
    state["iteration"] += 1
    # wait for the device every SYNC_STEPS steps, and before anything that ends the interval, so that the steps'
    # times add up to the real training time (the time waited counts to this step)
    sync = must_wait(session, state, interval, time.perf_counter() - started, interrupts)
    finite = not sync or math.isfinite(float(interval["bits"]))
    step_secs = time.perf_counter() - started
    state["train_secs"] += step_secs
    interval["secs"] += step_secs
    state["train_secs"], interval["secs"], signum, finite, agreed = dist.decide(
        sync, state["train_secs"], interval["secs"], interrupts.signum, finite, session.device)
    if not finite:
        raise NonFinite(f"non-finite train NLL by iteration {state['iteration']}")
    progress.step(state, interval, step_secs, synced=sync)
    interrupts.step_secs = progress.secs_per_it()
    return signum, agreed


def must_wait(session, state, interval, ahead, interrupts):
    """Whether to wait for the device after this step: always on the CPU, every SYNC_STEPS steps, at an interval's
    end or the budget's by iterations; in one process also when its own clock or a signal may end something
    (under torchrun the ranks' clocks differ, so they agree only at the fixed points)."""
    args, it = session.args, state["iteration"]
    fixed = session.device.type == "cpu" or interval["steps"] % SYNC_STEPS == 0 or \
        bool(args.print_iters and it % args.print_iters == 0) or bool(args.stop_iters and it >= args.stop_iters)
    return fixed or (dist.world_size() == 1 and (
        interrupts.signum is not None or interval["secs"] + ahead >= args.print_time or
        state["train_secs"] + ahead >= args.stop_time * 3600))
