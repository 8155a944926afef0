"""The training loop every model shares: two_tier.py, three_tier.py and baseline.py call train_main with theirs.

One session: read the settings (lib/settings.py), build the model, set up the data, the device and the run folder
(lib/run.py), then loop: draw a batch, step (lib/step.py), account; at an interval's end evaluate, save a
checkpoint, write samples; stop when the budget is spent or a signal asks (lib/stopping.py). Under torchrun every
rank runs this loop; lib/dist.py makes the ranks agree, and does nothing in one process.

Faults cost at most one step: Ctrl-C or SIGTERM saves a checkpoint mid-interval and exits 130 / 143; a
checkpoint is written only from finite values; --resume skips a damaged newest checkpoint and repairs what a
kill left (metrics row, samples, temporary files); a failed write is one line naming the last checkpoint.
"""
import copy
import gc
import json
import math
import os
import sys
import time
import traceback

import torch

from lib import Interrupted, UserError, WriteError, check_torch, dist, page, run
from lib.cuda_graph import captured_at_first_call
from lib.progress import Progress, rss_mb, warn_of_many_passes
from lib.plots import plot_curves
from lib.report import report
from lib.sample import write_samples
from lib.session import begin, setup
from lib.settings import SCRIPTS, build_parser, check_settings, choose_device, parse_settings
from lib.step import evaluate, to_device, train_step
from lib.stopping import Interrupts, NonFinite, non_finite

SYNC_STEPS = 16  # on CUDA the step runs ahead of the host; every this many steps it waits and checks the loss


def train_main(model_id, doc, add_model_args, build_model, default_tag, presets, argv=None):
    """Entry point of a model script: bad input is one line on stderr and exit status 2."""
    parser = build_parser(SCRIPTS[model_id], doc, add_model_args, presets)
    threads = torch.get_num_threads()
    try:
        code = train(model_id, parser, build_model, default_tag, presets, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the loop's own handlers (start-up), or a second Ctrl-C while saving
        print("\ninterrupted; nothing more was saved (no partial file is left)", file=sys.stderr)
        code = 130
    except Exception:  # a bug: its traceback, then the same orderly end as any other
        traceback.print_exc()
        code = 1
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests)
        run.release_runs()
    dist.cleanup()  # here, with no exception (and its frames) holding the training's objects
    sys.exit(code)


def train(model_id, parser, build_model, default_tag, presets, argv):
    check_torch(torch.__version__)
    args, resumed = parse_settings(model_id, parser, presets, argv)
    check_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)  # checks the model flags and fills derived ones
    n_params = sum(p.numel() for p in model.parameters())
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        print(f"{model_id}: {n_params:,} parameters")
        return 0
    world, saved_world = dist.world_size(), resumed and run.read_run_settings(args.resume).get("world_size", 1)
    if resumed and saved_world != world:
        raise UserError(f"{args.resume} was trained on {saved_world} process(es), this is {world}: resume it with "
                        f"the same torchrun --nproc_per_node")
    device = dist.setup(choose_device(args.device))
    if resumed and dist.rank() == 0:
        run.hold_run(args.resume)  # before anything is read or repaired: one process trains a run at a time
    s = setup(model_id, args, model, device, args.name or default_tag(args), resumed is not None)
    try:
        state, h = begin(s, n_params, resumed)
        with Interrupts(second_aborts=dist.world_size() == 1, say=s.log) as interrupts:
            s.stop = interrupts.requested
            return loop(s, state, h, interrupts)
    except WriteError as e:
        saved = run.checkpoint_paths(s.run_dir)
        print(f"error: {e}; " + (f"the last checkpoint is {os.path.basename(saved[-1])}" if saved else
                                 "no checkpoint had been written"), file=sys.stderr)
        return 1
    except RuntimeError as e:  # under torchrun, a process killed or its node gone: one line, not gloo's traceback
        lost = dist.lost_process(e)
        if lost is None:
            raise
        saved = run.checkpoint_paths(s.run_dir)
        print(f"error: {lost}; " + (f"the last checkpoint is {os.path.basename(saved[-1])}; continue with: "
                                    f"{continue_command(s)}" if saved else "no checkpoint had been written"),
              file=sys.stderr)
        return 1


def loop(s, state, h, interrupts):
    """Draw a batch, step, account; at the named points (interval due, budget spent, stop requested) do the named
    thing. -> the exit status."""
    interval = state.pop("interval", None) or new_interval()  # a checkpoint saved by Ctrl-C holds its sums
    if "ranks" in interval:  # under torchrun, each rank's own
        interval["bits"], interval["grad_norm"] = interval.pop("ranks")[dist.rank()]
    due = state.pop("interval_due", False)  # ... and whether the interval's end was cut short
    if budget_spent(s.args, state) and not due:
        s.log(f"nothing to do: the run is at iteration {state['iteration']}, {state['train_secs'] / 3600:.3f} h "
              f"(--stop_iters {s.args.stop_iters}, --stop_time {s.args.stop_time})")
        return 0
    wall_start = time.time() - state["wall_secs"]
    progress = Progress(s.args, state, s.log, s.device, s.samples_per_step, shown=s.main)
    step = make_step(s)
    s.model.train()
    try:
        while True:
            signum, agreed = None, True
            if not due:
                h, signum, agreed = take_step(s, step, state, interval, h, interrupts, progress)
                due = interval_due(s.args, state, interval, agreed)
            final = budget_spent(s.args, state, by_time=agreed)
            state["wall_secs"] = time.time() - wall_start
            if due or final:
                final, code = close_interval(s, state, interval, h, final, interrupts)
                if code is not None:
                    return code
                interval, due = new_interval(), False
                s.model.train()
            if final:
                if s.main:
                    s.log("the run's row for experiments.md (python -m lib.report compares several):\n" +
                          report([s.run_dir]))
                return 0
            if signum is not None:
                return interrupted(s, state, *shared(s, interval, h), signum)
    except NonFinite as e:
        saved = run.checkpoint_paths(s.run_dir)
        s.log(f"error: {e}; stopped without saving it. " + (f"The last good checkpoint is {saved[-1]}" if saved
                                                              else "No checkpoint had been saved yet."))
        return 1
    finally:
        progress.close()


def new_interval():
    return {"bits": 0.0, "grad_norm": 0.0, "steps": 0, "secs": 0.0}


def budget_spent(args, state, by_time=True):
    """--stop_iters reached, --stop_time spent (when the clocks are agreed), or --patience run out."""
    return bool(args.stop_iters and state["iteration"] >= args.stop_iters) or \
        (by_time and state["train_secs"] >= args.stop_time * 3600) or patience_reached(args, state["since_best"])


def patience_reached(args, since_best):
    return bool(args.patience) and since_best >= args.patience


def interval_due(args, state, interval, agreed):
    if args.print_iters:
        return state["iteration"] % args.print_iters == 0
    return agreed and interval["secs"] >= args.print_time


def make_step(s):
    """step(chunk, reset, h) -> (bits, grad_norm, h): train_step, or with --cuda_graph_step its CUDA graphs
    (captured at the first call, lib/cuda_graph.py)."""
    args = s.args
    if args.cuda_graph_step:
        return captured_at_first_call(s.model, s.optimizer, args.grad_clip, args.precision)
    return lambda chunk, reset, h: train_step(s.model, s.optimizer, chunk, reset, h, args.grad_clip,
                                              args.precision, s.net)


def take_step(s, step, state, interval, h, interrupts, progress):
    """One training step, timed, with its sums kept on the device -> (h, signum, agreed): the signal that stops
    the run, and whether the clocks were agreed at this step (always, in one process)."""
    t0 = time.perf_counter()
    chunk, reset = s.batches(state["iteration"])
    bits, grad_norm, h = step(to_device(chunk, s.device), reset, h)
    interval["bits"] += bits  # device tensors: read once per SYNC_STEPS, not per step
    interval["grad_norm"] += grad_norm
    interval["steps"] += 1
    state["iteration"] += 1
    # wait for the device every SYNC_STEPS steps, and before anything that ends the interval, so that the steps'
    # times add up to the real training time (the time waited counts to this step)
    sync = must_wait(s, state, interval, time.perf_counter() - t0, interrupts)
    finite = not sync or math.isfinite(float(interval["bits"]))
    step_secs = time.perf_counter() - t0
    state["train_secs"] += step_secs
    interval["secs"] += step_secs
    state["train_secs"], interval["secs"], signum, finite, agreed = dist.decide(
        sync, state["train_secs"], interval["secs"], interrupts.signum, finite, s.device)
    if not finite:
        raise NonFinite(f"non-finite train NLL by iteration {state['iteration']}")
    progress.step(state, interval, step_secs, synced=sync)
    interrupts.step_secs = progress.secs_per_it()
    return h, signum, agreed


def must_wait(s, state, interval, ahead, interrupts):
    """Whether to wait for the device after this step: always on the CPU, every SYNC_STEPS steps, at an interval's
    end or the budget's by iterations; in one process also when its own clock or a signal may end something
    (under torchrun the ranks' clocks differ, so they agree only at the fixed points)."""
    args, it = s.args, state["iteration"]
    fixed = s.device.type == "cpu" or interval["steps"] % SYNC_STEPS == 0 or \
        bool(args.print_iters and it % args.print_iters == 0) or bool(args.stop_iters and it >= args.stop_iters)
    return fixed or (dist.world_size() == 1 and (
        interrupts.signum is not None or interval["secs"] + ahead >= args.print_time or
        state["train_secs"] + ahead >= args.stop_time * 3600))


def settled(interval):
    """The interval's sums as numbers (waiting for the device); each rank's own ("ranks") as they are."""
    return {k: int(v) if k == "steps" else v if k == "ranks" else float(v) for k, v in interval.items()}


def shared(s, interval, h):
    """The interval's sums as floats (waiting for the device) and h, for saving: under torchrun, the mean of the
    ranks' train NLL and grad norm (equal on every rank: DDP averages the gradients), and every rank's h."""
    interval = settled(interval)
    own = [interval["bits"], interval["grad_norm"]]
    interval["bits"], interval["grad_norm"] = dist.mean(own, s.device)
    if dist.world_size() > 1:  # each rank's own sums, for a save mid-interval: resumed from their mean, the
        interval["ranks"] = dist.gather_values(own, s.device)  # additions would come in another order
    return interval, dist.gather_rows(h)


def close_interval(s, state, interval, h, final, interrupts):
    """Rank 0 ends the interval (end_interval); every rank goes on from its outcome -> (final, exit status or
    None to go on). A signal during the evaluation or the samples saves what resuming needs to redo the rest."""
    interval, h_all = shared(s, interval, h)
    outcome, error = None, None
    if s.main:
        try:
            final = end_interval(s, state, interval, h_all, final)
        except Interrupted as e:
            outcome = ("saved" if e.saved else "unsaved", interrupts.signum)
        except (NonFinite, WriteError) as e:
            outcome, error = ("error", None), e
    outcome, final, state_now = dist.share((outcome, final, state))
    state.update(state_now)
    if outcome and outcome[0] == "error":
        if s.main:
            raise error
        return final, 1
    if outcome and outcome[0] == "saved":  # the checkpoint is saved; resuming writes the samples
        return final, interrupted(s, state, new_interval(), h_all, outcome[1])
    if outcome:  # resuming does the whole interval's end again
        return final, interrupted(s, dict(state, interval_due=True), interval, h_all, outcome[1])
    return final, None


def end_interval(s, state, interval, h, final):
    """Log the interval, evaluate, checkpoint (and best.pt when valid NLL improved), write samples -> whether the
    run ends here (its budget, or --patience). None of this counts as training time.
    Nothing is saved from non-finite values (NonFinite). The checkpoint holds the interval's metrics row and is
    written first: a failed write leaves no row without its checkpoint, and resume puts back a row, best.pt or
    samples that a kill cut off. A signal stops the evaluation or the samples (Interrupted, saying whether the
    checkpoint was written). At the end, test NLL is measured on the last weights and on best.pt's. Last, the
    curves and the run's page to listen with (index.html, lib/page.py) are rewritten."""
    args, it = s.args, state["iteration"]
    nll = lambda model, split, clips=0: evaluate(model, s.splits[split], args.batch_size, s.device, clips, s.stop)  # noqa: E731
    row = {"iteration": it, "train_secs": round(state["train_secs"], 3), "wall_secs": round(state["wall_secs"], 3),
           "epochs": round(it * s.clips_per_step / s.chunks_per_epoch, 4),
           "train_bits": interval["bits"] / interval["steps"], "valid_bits": nll(s.model, "valid", args.valid_clips),
           "grad_norm": interval["grad_norm"] / interval["steps"],
           "samples_per_sec": round(s.samples_per_step * interval["steps"] / interval["secs"], 1), "rss_mb": rss_mb()}
    bad = non_finite(s.model, {"train NLL": row["train_bits"], "grad norm": row["grad_norm"],
                               "valid NLL": row["valid_bits"]})
    improved = row["valid_bits"] < state["best_valid"]
    since_best = 0 if improved else state["since_best"] + 1
    final = final or patience_reached(args, since_best)
    row["best_iteration"] = it if improved else state["best_iteration"]
    if not bad and final:
        row["test_bits"] = nll(s.model, "test")
        row["best_test_bits"] = row["test_bits"] if improved else nll(best_model(s), "test")
    test = f" | test {row['test_bits']:.4f}" if "test_bits" in row else ""
    s.log(f"iter {it:7d} | epoch {row['epochs']:.2f} | train {row['train_bits']:.4f} | valid {row['valid_bits']:.4f}"
          f"{' *' if improved else ''}{test} bits/sample | grad norm {row['grad_norm']:.3f} | "
          f"{row['samples_per_sec']:,.0f} samples/s | train {state['train_secs'] / 3600:.3f} h, "
          f"wall {state['wall_secs'] / 3600:.3f} h")
    if bad:
        raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
    if final:
        s.log(f"best valid NLL {min(state['best_valid'], row['valid_bits']):.4f} at iteration {row['best_iteration']} "
              f"(checkpoints/best.pt): test {row['best_test_bits']:.4f} bits/sample" +
              (f"; stopped early: no improvement in {since_best} intervals (--patience {args.patience})"
               if patience_reached(args, since_best) else ""))
    state.update(best_valid=min(state["best_valid"], row["valid_bits"]), best_iteration=row["best_iteration"],
                 since_best=since_best)
    path = save(s, state, h, row)
    if improved:
        run.write_best(s.run_dir, path)
    if args.keep_checkpoints:
        run.keep_newest(s.run_dir, args.keep_checkpoints)
    run.append_metrics(s.run_dir, row)
    if not s.warned:
        s.warned = True
        warn_of_many_passes(args, state, interval, s.clips_per_step, s.chunks_per_epoch, s.log)
    try:
        write_samples(s.model, run.sample_paths(s.run_dir, it, args.n_samples), args.sample_secs, s.sample_rate,
                      args, s.stop)
    except Interrupted:
        raise Interrupted(saved=True) from None
    plot_curves({os.path.basename(s.run_dir): run.read_metrics(s.run_dir)}, os.path.join(s.run_dir, "curves.png"))
    page.write_run_page(s.run_dir, quiet=True)  # index.html, with the new samples' spectrograms
    gc.collect()  # a closed matplotlib figure's reference cycles otherwise hold ~2.5 MB each until a rare full GC
    return final


def save(s, state, h, row):
    """Everything needed to continue exactly, and the interval's metrics row (None when saved mid-interval)."""
    return run.save_checkpoint(s.run_dir, {
        "model_id": s.model_id, "run_id": s.run_id, "settings": vars(s.args), "sample_rate": s.sample_rate,
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "state": dict(state), "row": row,
        "h": None if h is None else h.cpu()})  # no global RNG state: nothing draws from it


def interrupted(s, state, interval, h, signum):
    """Save mid-interval (with the interval's running sums, and whether its end is still to do, so that resuming
    gives the uninterrupted run's metrics) and say how to continue."""
    it = state["iteration"]
    interval = settled(interval)
    if s.main and (interval["steps"] or state.get("interval_due")):  # else the interval's end saved it
        bad = non_finite(s.model, {"train NLL": interval["bits"], "grad norm": interval["grad_norm"]})
        if bad:
            raise NonFinite(f"non-finite {', '.join(bad)} at iteration {it}")
        save(s, dict(state, interval=interval), h, row=None)
    s.log(f"interrupted at iteration {it}; saved {run.checkpoint_path(s.run_dir, it)}; continue with: "
          f"{continue_command(s)}")
    return 128 + signum


def continue_command(s):
    world = dist.world_size()
    return f"{'python' if world == 1 else f'torchrun --nproc_per_node {world}'} {SCRIPTS[s.model_id]} --resume {s.run_dir}"


def best_model(s):
    """A copy of the model with best.pt's weights (for the end-of-run test NLL)."""
    best = copy.deepcopy(s.model)
    best.load_state_dict(run.own_checkpoint(s.run_dir, run.best_path(s.run_dir))["model"])
    return best


