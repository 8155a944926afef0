"""An interval's end, the same for every model: rank 0 measures it (train NLL since the last end, valid NLL, and
at the run's end test NLL on the last and the best weights), logs it and writes what it leaves (the checkpoint
first, best.pt, the metrics row, the samples, the curves, the page, TensorBoard); every rank goes on from the
outcome. And a stop mid-interval: the checkpoint with the interval's running sums, and how to continue."""
import copy
import gc
import os

from lib import Interrupted, WriteError, checkpoint, dist, page, run
from lib.cli import script_of
from lib.plots import plot_curves
from lib.progress import rss_mb, warn_of_many_passes
from lib.sample import write_samples
from lib.step import evaluate
from lib.stopping import NonFinite, non_finite


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
    args, run_dir, it = session.args, session.run_dir, state["iteration"]
    layout = run.Layout(run_dir)
    path = checkpoint.save(run_dir, checkpoint.build(session, state, h, row))
    drop_stop_checkpoint(session, path)
    if improved:
        checkpoint.write_best(run_dir, path)
    if args.keep_checkpoints:
        checkpoint.keep_newest(run_dir, args.keep_checkpoints)
    run.append_metrics(run_dir, row)
    if not session.warned:
        session.warned = True
        warn_of_many_passes(args, state, interval, session.clips_per_step, session.chunks_per_epoch, session.log)
    try:
        write_samples(session.model, layout.sample_paths(it, args.n_samples), args.sample_secs,
                      session.sample_rate, args, session.stop)
    except Interrupted:
        raise Interrupted(saved=True) from None
    plot_curves({os.path.basename(run_dir): run.read_metrics(run_dir)}, layout.curves)
    page.write_run_page(run_dir, quiet=True)  # index.html, with the new samples' spectrograms
    if session.board is not None:
        session.board.interval(row, args.lr, layout.sample_paths(it, args.n_samples), session.sample_rate)
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
        drop_stop_checkpoint(session, checkpoint.save(session.run_dir, checkpoint.build(
            session, dict(state, interval=interval), h, row=None)))
    session.log(f"interrupted at iteration {it}; saved {checkpoint.path_at(session.run_dir, it)}; continue with: "
                f"{continue_command(session)}")
    return 128 + signum


def drop_stop_checkpoint(session, saved):
    """Once a newer checkpoint is saved, the one a stop wrote mid-interval, which this session resumed from, is
    superseded (it ends no interval: no metrics row points at it) and removed: each Ctrl-C of the default model
    would otherwise keep 251 MB."""
    old, session.stop_checkpoint = session.stop_checkpoint, None
    if old and old != saved and os.path.exists(old):
        os.remove(old)
        session.log(f"removed {os.path.basename(old)}, the mid-interval checkpoint this session resumed from "
                    f"(superseded by {os.path.basename(saved)})")


def continue_command(session):
    world = dist.world_size()
    return (f"{'python' if world == 1 else f'torchrun --nproc_per_node {world}'} {script_of(session.model_id)} "
            f"--resume {session.run_dir}")


def best_model(session, iteration):
    """A copy of the model with the run's best weights, of `iteration` (for the end-of-run test NLL): best.pt's, or
    where best.pt is missing, damaged or not the run's, its own checkpoint of that iteration (best.pt rebuilt from
    it); None, with one line, where neither is left."""
    ckpt, said = checkpoint.best_of_run(session.run_dir, iteration)
    if said:
        session.log(f"note: {said}" + ("" if ckpt else "; the test NLL is measured on the last weights only"))
    if ckpt is None:
        return None
    best = copy.deepcopy(session.model)
    best.load_state_dict(ckpt["model"])
    return best
