"""The training loop every model shares: two_tier.py, three_tier.py and baseline.py call train_main with theirs.

One session: the run to continue, if any (lib/checkpoint.py), the flags (lib/settings.py), the model, the data,
the device and the run folder (lib/session.py), then the loop: draw a batch, step (lib/step.py), account; at an
interval's end (below) rank 0 measures it (train NLL since the last end, valid NLL, and at the run's end test NLL
on the last and the best weights), logs it and writes what it leaves (the checkpoint first, best.pt, the metrics
row, the samples, the curves, the page, TensorBoard); stop when the budget is spent or a signal asks
(lib/terminal.py). Under torchrun every rank runs this loop; lib/dist.py makes the ranks agree, and does nothing
in one process.

Faults cost at most one step: Ctrl-C or SIGTERM saves a checkpoint mid-interval and exits 130 / 143; a
checkpoint is written only from finite values; --resume skips a damaged newest checkpoint and repairs what a
kill left (metrics row, samples, temporary files); a failed write is one line naming the last checkpoint.
"""
import copy
import gc
import math
import os
import signal
import sys
import time
import traceback

import torch

from lib import MODELS, Interrupted, UserError, WriteError, checkpoint, dist, page, run
from lib.cli import quiet_interrupts, script_of
from lib.cuda_graph import captured_at_first_call
from lib.plots import plot_curves
from lib.sample import write_samples
from lib.session import begin, continue_command, drop_stop_checkpoint, samples_backend, start
from lib.settings import build_parser
from lib.step import NonFinite, evaluate, non_finite, to_device, train_step
from lib.terminal import Interrupts, Progress, rss_mb, warn_of_many_passes

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
    """The session started (lib/session.py: the run to continue, the flags, the model, the data, the device, the
    run folder), then the loop -> the exit status."""
    session, n_params, resumed = start(model_id, parser, build_model, presets, argv)
    if session is None:  # --dry_run: the flags were printed
        return 0
    try:
        return train_session(session, n_params, resumed)
    except BaseException:  # a new run that could not start (out of memory, a signal, bad data): no folder is left
        if resumed is None and session.main:
            session.run.remove_unstarted(folder_too=session.args.run_dir is None)
        raise


def train_session(session, n_params, resumed):
    """The session's run begun or restored, then the loop -> the exit status; a failed write, or a process lost
    under torchrun, is one line naming the last checkpoint."""
    try:
        state, h = begin(session, n_params, resumed)
        with Interrupts(second_aborts=dist.world_size() == 1, say=session.log) as interrupts:
            session.stop = interrupts.stopping
            return loop(session, state, h, interrupts)
    except WriteError as e:
        print(f"error: {e}; {last_checkpoint(session.run)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # under torchrun, a process killed or its node gone: one line, not gloo's traceback
        lost = dist.lost_process(e)
        if lost is None:
            raise
        saved = checkpoint.paths(session.run)
        print(f"error: {lost}; {last_checkpoint(session.run)}" +
              (f"; continue with: {continue_command(session)}" if saved else ""), file=sys.stderr)
        return 1


def last_checkpoint(folder):
    saved = checkpoint.paths(folder)
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
                                report([session.run.folder]))
                return 0
            if signum is not None:
                return interrupted(session, state, *gathered(session, interval, h), signum)
    except NonFinite as e:
        saved = checkpoint.paths(session.run)
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


# An interval's end, the same for every model; and a stop mid-interval: the checkpoint with the interval's
# running sums, and how to continue.
def new_interval():
    return {"bits": 0.0, "grad_norm": 0.0, "steps": 0, "secs": 0.0}


def patience_reached(args, since_best):
    return bool(args.patience) and since_best >= args.patience


def settled(interval):
    """The interval's sums as numbers (waiting for the device); each rank's own ("ranks") as they are."""
    return {k: int(v) if k == "steps" else v if k == "ranks" else float(v) for k, v in interval.items()}


def gathered(session, interval, h):
    """The interval's sums as floats (waiting for the device) and h, gathered for saving: under torchrun, the mean
    of the ranks' train NLL and grad norm (equal on every rank: DDP averages the gradients), and every rank's h."""
    interval = settled(interval)
    own = [interval["bits"], interval["grad_norm"]]
    interval["bits"], interval["grad_norm"] = dist.mean(own, session.device)
    if dist.world_size() > 1:  # each rank's own sums, for a save mid-interval: resumed from their mean, the
        interval["ranks"] = dist.gather_values(own, session.device)  # additions would come in another order
    return interval, dist.gather_rows(h)


def end_interval_on_every_rank(session, state, interval, h, final, interrupts):
    """Rank 0 ends the interval (end_interval_on_rank0); every rank goes on from its outcome -> (final, exit status or
    None to go on). A signal during the evaluation or the samples saves what resuming needs to redo the rest."""
    interval, h_all = gathered(session, interval, h)
    outcome, error = None, None
    if session.main:
        try:
            final = end_interval_on_rank0(session, state, interval, h_all, final)
        except Interrupted as e:
            outcome = ("saved" if e.saved else "unsaved", interrupts.signum)
        except (NonFinite, WriteError) as e:
            outcome, error = ("error", None), e
    outcome, final, state_now = dist.from_rank0((outcome, final, state))
    state.update(state_now)
    if outcome and outcome[0] == "error":
        if session.main:
            raise error
        return final, 1
    if outcome and outcome[0] == "saved":  # the checkpoint is saved; resuming writes the samples
        return final, interrupted(session, state, new_interval(), h_all, outcome[1])
    if outcome:  # resuming does the whole interval's end again
        return final, interrupted(session, dict(state, interval_due=True), interval, h_all, outcome[1])
    return final, None


def end_interval_on_rank0(session, state, interval, h, final):
    """Measure the interval (its metrics row, and at the run's end test NLL), log it, then write what it leaves
    (write_interval) -> whether the run ends here (its budget, or --patience). None of this counts as training
    time. Nothing is saved from non-finite values (NonFinite)."""
    args, it = session.args, state["iteration"]
    row = measure(session, state, interval)
    improved = row["valid_bits"] < state["best_valid"]
    since_best = 0 if improved else state["since_best"] + 1
    final = final or patience_reached(args, since_best)
    row["best_iteration"] = it if improved else state["best_iteration"]
    bad = non_finite(session.model, {"train NLL": row["train_bits"], "grad norm": row["grad_norm"],
                                     "valid NLL": row["valid_bits"]})
    if not bad and final:  # test NLL on the last weights and on best.pt's
        row["test_bits"] = nll(session, session.model, "test")
        best = session.model if improved else best_model(session, state["best_iteration"])
        row["best_test_bits"] = None if best is None else row["test_bits"] if improved else nll(session, best, "test")
    log_row(session, state, row, improved)
    if bad:
        raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
    if final:
        session.log(f"best valid NLL {min(state['best_valid'], row['valid_bits']):.4f} at iteration "
                    f"{row['best_iteration']} (checkpoints/best.pt): " + ("no test NLL on it (its weights are gone)"
                                                                         if row["best_test_bits"] is None else
                                                                         f"test {row['best_test_bits']:.4f} bits/sample") +
                    (f"; stopped early: no improvement in {since_best} intervals (--patience {args.patience})"
                     if patience_reached(args, since_best) else ""))
    state.update(best_valid=min(state["best_valid"], row["valid_bits"]), best_iteration=row["best_iteration"],
                 since_best=since_best)
    write_interval(session, state, interval, h, row, improved)
    return final


def nll(session, model, split, clips=0):
    """Mean NLL in bits per sample over the split's first `clips` clips (0: all); a signal stops it."""
    return evaluate(model, session.splits[split], session.args.batch_size, session.device, clips, session.stop)


def measure(session, state, interval):
    """The interval's metrics row: progress, clocks, train NLL and grad norm (the interval's means), valid NLL,
    throughput, memory."""
    it, steps = state["iteration"], interval["steps"]
    return {"iteration": it, "train_secs": round(state["train_secs"], 3), "wall_secs": round(state["wall_secs"], 3),
            "epochs": round(it * session.clips_per_step / session.chunks_per_epoch, 4),
            "train_bits": interval["bits"] / steps,
            "valid_bits": nll(session, session.model, "valid", session.args.valid_clips),
            "grad_norm": interval["grad_norm"] / steps,
            "samples_per_sec": round(session.samples_per_step * steps / interval["secs"], 1), "rss_mb": rss_mb()}


def log_row(session, state, row, improved):
    test = f" | test {row['test_bits']:.4f}" if "test_bits" in row else ""
    session.log(f"iter {row['iteration']:7d} | epoch {row['epochs']:.2f} | train {row['train_bits']:.4f} | valid "
                f"{row['valid_bits']:.4f}{' *' if improved else ''}{test} bits/sample | grad norm "
                f"{row['grad_norm']:.3f} | {row['samples_per_sec']:,.0f} samples/s | train "
                f"{state['train_secs'] / 3600:.3f} h, wall {state['wall_secs'] / 3600:.3f} h")


def write_interval(session, state, interval, h, row, improved):
    """The checkpoint first (it holds the interval's metrics row: a failed write leaves no row without its
    checkpoint, and resume puts back a row, best.pt or samples that a kill cut off), best.pt when valid NLL
    improved, the metrics row, the samples, the curves and the run's page to listen with (lib/page.py). A signal
    stops the samples (Interrupted, saying that the checkpoint was written)."""
    args, folder, it = session.args, session.run, state["iteration"]
    path = checkpoint.save(folder, checkpoint.build(session, state, h, row))
    drop_stop_checkpoint(session, path)
    if improved:
        checkpoint.write_best(folder, path)
    if args.keep_checkpoints:
        checkpoint.keep_newest(folder, args.keep_checkpoints)
    folder.append_metrics(row)
    if not session.warned:
        session.warned = True
        warn_of_many_passes(args, state, interval, session.clips_per_step, session.chunks_per_epoch, session.log)
    try:
        write_samples(session.model, folder.sample_paths(it, args.n_samples), args.sample_secs,
                      session.sample_rate, args, session.stop, samples_backend(session))
    except Interrupted:
        raise Interrupted(saved=True) from None
    plot_curves({os.path.basename(folder.folder): folder.metrics()}, folder.curves)
    page.write_run_page(folder, quiet=True)  # index.html, with the new samples' spectrograms
    if session.board is not None:
        session.board.interval(row, args.lr, folder.sample_paths(it, args.n_samples), session.sample_rate)
    gc.collect()  # a closed matplotlib figure's reference cycles otherwise hold ~2.5 MB each until a rare full GC


def interrupted(session, state, interval, h, signum):
    """Save mid-interval (with the interval's running sums, and whether its end is still to do, so that resuming
    gives the uninterrupted run's metrics) and say how to continue."""
    it = state["iteration"]
    interval = settled(interval)
    if session.main and (interval["steps"] or state.get("interval_due")):  # else the interval's end saved it
        bad = non_finite(session.model, {"train NLL": interval["bits"], "grad norm": interval["grad_norm"]})
        if bad:
            raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
        drop_stop_checkpoint(session, checkpoint.save(session.run, checkpoint.build(
            session, dict(state, interval=interval), h, row=None)))
    session.log(f"interrupted at iteration {it}; saved {session.run.checkpoint(it)}; continue with: "
                f"{continue_command(session)}")
    return 128 + signum


def best_model(session, iteration):
    """A copy of the model with the run's best weights, of `iteration` (for the end-of-run test NLL): best.pt's, or
    where best.pt is missing, damaged or not the run's, its own checkpoint of that iteration (best.pt rebuilt from
    it); None, with one line, where neither is left."""
    ckpt, said = checkpoint.best_of_run(session.run, iteration)
    if said:
        session.log(f"note: {said}" + ("" if ckpt else "; the test NLL is measured on the last weights only"))
    if ckpt is None:
        return None
    best = copy.deepcopy(session.model)
    best.load_state_dict(ckpt["model"])
    return best
