"""Named mutations: each puts one realistic bug into a copy of the repository and runs the test that guards the
claim it breaks; the test must fail ("caught"). Outside CI (minutes). notes/testing.md keeps the last result.

    python tests/mutations.py            # all
    python tests/mutations.py floor_not_round temperature_times

First the control: the chosen mutations' guards must pass on an unmutated copy (else "caught" would mean nothing).
Each result names the first test that failed and why.
"""
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, text, replacement, the guarding tests)
MUTATIONS = {
    "temperature_times": ("lib/sample.py", "logits = logits / temperature", "logits = logits * temperature",
                          "tests/test_sample.py::test_temperature_draws_from_softmax_of_logits_over_t"),
    "floor_not_round": ("lib/quantize.py", "return torch.round((y + 1) * (q_levels / 2))",
                        "return torch.floor((y + 1) * (q_levels / 2))",
                        "tests/test_quantize.py::test_linear_rounds_to_the_nearest_level_between_levels"),
    "mulaw_decoder_off": ("lib/quantize.py", "torch.expm1(y.abs() * math.log1p(mu)) / mu",
                          "torch.expm1(y.abs() * math.log1p(mu + 8)) / (mu + 8)",
                          "tests/test_quantize.py::test_companded_error_is_within_half_a_step_in_the_compressed_domain"),
    "reals_scale": ("lib/quantize.py", "return (q.float() / (q_levels / 2) - 1) * 2",
                    "return (q.float() / (q_levels / 2) - 1) * 1.99",
                    "tests/test_quantize.py::test_reals_span_minus_two_to_two"),
    "gru_ignores_carried_h": ("lib/layers.py", "        if h is None:\n            h = self.initial_state",
                              "        if True:\n            h = self.initial_state",
                              "tests/test_models.py::test_the_carried_hidden_state_links_chunks"),
    "data_order_from_global_rng": ("lib/data.py", "torch.randperm(n, generator=torch.Generator().manual_seed("
                                   "self.seed * 1_000_003 + epoch))", "torch.randperm(n)",
                                   "tests/test_train.py::test_training_never_draws_from_the_global_rng"),
    "prime_written_as_zeros": ("generate.py", "head = dequantize(prime, settings.q_levels, settings.qtype).numpy()",
                               "head = 0 * dequantize(prime, settings.q_levels, settings.qtype).numpy()",
                               "tests/test_sample.py::test_generate_from_a_checkpoint_with_a_prime_at_another_rate"),
    "nan_reaches_a_checkpoint": ("lib/train.py", "    if bad:\n        raise NonFinite(f\"non-finite {', '.join(bad)} "
                                 "at iteration {it}\")\n    if final:",
                                 "    if final:",
                                 "tests/test_faults.py::test_non_finite_values_never_reach_a_checkpoint"),
    "md5_not_checked": ("lib/download.py", 'verify(path, "md5", entry["md5"], "run the command again")', "pass",
                        "tests/test_download.py::test_a_beethoven_file_with_the_wrong_md5_is_refused_and_kept_aside"),
    "cache_key_without_ctime": ("lib/cache.py", "st.st_mtime_ns, st.st_ctime_ns))", "st.st_mtime_ns))",
                                "tests/test_cache.py::test_a_replaced_file_with_its_old_time_is_seen"),
    "cache_not_checksummed": ("lib/cache.py", "if crc32_of(f) != crc:", "if False:",
                              "tests/test_cache.py::test_a_damaged_cache_is_rebuilt_with_one_warning"),
    "split_read_into_memory": ("lib/cache.py", 'np.memmap(f, dtype=np.int16, mode="r") if size else',
                               'np.array(np.memmap(f, dtype=np.int16, mode="r")) if size else',
                               "tests/test_data.py::test_memory_stays_flat_however_many_hours_the_dataset_holds"),
    "cache_without_lock": ("lib/cache.py", "fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
                           "tests/test_cache.py::test_two_builds_at_once_build_once_and_both_read_the_right_samples"),
    "resume_ignores_changed_data": ("lib/session.py", "    if not change:\n        return", "    return",
                                    "tests/test_resume.py::test_resume_refuses_changed_data_and_says_what_changed"),
    "run_not_locked": ("lib/run.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
                       "tests/test_resume.py::test_a_second_process_on_a_training_run_is_refused_naming_the_first"),
    "resume_loses_h": ("lib/checkpoint.py", "h = None if ckpt[\"h\"] is None else ckpt[\"h\"][:, rows].to(device)",
                       "h = None", "tests/test_train.py::test_resume_continues_exactly"),
    "interval_accounting_off_by_one": ("lib/train.py", "interval[\"steps\"] += 1\n    state[\"iteration\"] += 1",
                                       "interval[\"steps\"] += 1 if state[\"iteration\"] else 2\n    "
                                       "state[\"iteration\"] += 1",
                                       "tests/test_fingerprint.py::test_a_fixed_seed_run_computes_what_it_did"),
    "page_links_absolute": ("lib/page.py", 'return quote(os.path.relpath(path, page_dir).replace(os.sep, "/"))',
                            'return "file://" + quote(os.path.abspath(path))',
                            "tests/test_page.py::test_the_run_page_in_a_browser"),
    "page_not_rewritten": ("lib/train.py", "    page.write_run_page(folder, quiet=True)  # index.html", "    pass  #",
                           "tests/test_page.py::test_a_fresh_run_writes_its_page_with_every_interval_and_sample"),
    "threetier_kernel_reads_ahead": ("lib/kernels.py", "x_in[r, j] = reals[win[r, s - fs + j]]",
                                     "x_in[r, j] = reals[win[r, s + j - 1]]",
                                     "tests/test_sample.py::test_fast_path_equals_reference"),
    "mlp_frame_reads_ahead": ("lib/kernels.py", "        p0 = first + j\n", "        p0 = first + j + 1\n",
                              "tests/test_sample.py::test_fast_path_equals_reference"),
    "frame_tier_sees_its_frame": ("two_tier.py", "self.frame_rnn(x[:, :-fs].reshape(B, T // fs, fs), h)",
                                  "self.frame_rnn(x[:, fs:].reshape(B, T // fs, fs), h)",
                                  "tests/test_models.py::test_causality_across_a_chunk_boundary"),
    "mlp_sees_its_sample": ("two_tier.py", "prev = x[:, :-1].unfold(1, fs, 1)", "prev = x[:, 1:].unfold(1, fs, 1)",
                            "tests/test_models.py::test_causality_across_a_chunk_boundary"),
    "big_tier_sees_its_big_frame": ("three_tier.py", "self.big_rnn(x[:, :-bfs].reshape(B, T // bfs, bfs), h_big)",
                                    "self.big_rnn(x[:, bfs:].reshape(B, T // bfs, bfs), h_big)",
                                    "tests/test_models.py::test_causality_across_a_chunk_boundary"),
    "eval_counted_as_training_time": ("lib/train.py", 'state["wall_secs"] = time.time() - wall_start',
                                      'state["wall_secs"] = state["train_secs"] = time.time() - wall_start',
                                      "tests/test_promises.py::test_time_budgets_count_training_time_only_and_resume"),
    "samples_decoded_as_linear": ("lib/sample.py", "audio = dequantize(seqs, flags.q_levels, flags.qtype).numpy()",
                                  "audio = dequantize(seqs, flags.q_levels).numpy()",
                                  "tests/test_promises.py::test_generated_samples_are_decoded_with_the_runs_quantization"),
    "generate_decodes_as_linear": ("generate.py", "audio = dequantize(levels, settings.q_levels, settings.qtype).numpy()",
                                   "audio = dequantize(levels, settings.q_levels).numpy()",
                                   "tests/test_promises.py::test_generated_samples_are_decoded_with_the_runs_quantization"),
    "split_of_the_unsorted_list": ("lib/prepare.py", "    order = sorted(files)\n", "    order = list(files)\n",
                                   "tests/test_promises.py::test_the_split_is_90_5_5_by_file"),
    "parameters_counted_without_biases": ("lib/session.py", "n_params = sum(p.numel() for p in model.parameters())",
                                          "n_params = sum(p.numel() for p in model.parameters() if p.dim() > 1)",
                                          "tests/test_promises.py::test_readme_parameter_counts_are_what_the_scripts_print"),
    "bad_wav_breaks_the_page": ("lib/page.py", "except (BadAudio, WriteError, OSError) as e:",
                                "except (WriteError, OSError) as e:",
                                "tests/test_page.py::test_a_damaged_or_unfinished_run_still_gets_its_page_with_one_warning_per_missing_piece"),
    # the run folder's history and its outputs (issue 36)
    "resume_starts_over_with_history": ("lib/checkpoint.py", "    if found is None:\n        refuse_to_start_over(",
                                        "    if False:\n        refuse_to_start_over(",
                                        "tests/test_history.py::test_a_finished_run_without_checkpoints_is_refused_never_started_over"),
    "pruning_counts_other_runs": ("lib/checkpoint.py", "own = [p for p in paths(run) if read(record, p, mmap=True)[0] "
                                  "is not None]", "own = paths(run)",
                                  "tests/test_history.py::test_keep_checkpoints_counts_only_the_runs_own"),
    "flags_unchecked_when_ids_agree": ("lib/checkpoint.py", "    if all(ckpt[\"settings\"].get(k) == raw.get(k)",
                                       "    if True or all(ckpt[\"settings\"].get(k) == raw.get(k)",
                                       "tests/test_run_folder.py::test_a_checkpoint_is_the_runs_own_only_with_the_runs_flags_where_ids_cannot_tell"),
    "run_id_unchecked": ("lib/checkpoint.py", '    if ckpt.get("run_id") != record.get("run_id"):', "    if False:",
                         "tests/test_history.py::test_generate_best_refuses_a_best_pt_of_another_run"),
    "roles_ignored_by_seed": ("lib/report.py", 'if role(k) in A_SETTING and k not in ("seed", "data")}',
                              'if k not in ("seed", "data")}',
                              "tests/test_roles.py::test_where_and_how_a_run_writes_never_splits_a_setting"),
    "missing_flag_compares_as_absent": ("lib/settings.py", "            settings[flag] = value", "            pass",
                                        "tests/test_roles.py::test_one_setting_is_one_row_though_older_runs_lack_later_flags"),
    "temporary_files_anywhere": ("lib/run.py", "            if re.fullmatch(pattern, name):", "            if '.tmp' in name:",
                                 "tests/test_run_folder.py::test_a_resume_removes_only_the_temporary_files_it_wrote"),
    "foreign_checkpoint_overwritten": ("lib/checkpoint.py", "        if problem:\n            set_aside(path, problem)",
                                       "        if False:\n            set_aside(path, problem)",
                                       "tests/test_run_folder.py::test_a_checkpoint_resume_skipped_is_set_aside_and_the_samples_of_a_redone_interval_too"),
    "sampler_compiled_without_lock": ("lib/teams.py", "        fcntl.flock(fd, fcntl.LOCK_EX)\n", "",
                                      "tests/test_newcomer.py::test_two_processes_compile_the_sampler_once"),
    "page_replaces_any_file": ("lib/page.py", "    if os.path.lexists(path) and not overwrite and not is_page(path, kind):",
                               "    if False:", "tests/test_outputs.py::test_report_never_replaces_a_file_it_did_not_write"),
    "index_unchecked": ("lib/cache.py", "    if index_checksum(offsets, stats, rate, crc) != int(index_crc):",
                        "    if False:", "tests/test_cache.py::test_a_damaged_index_that_still_loads_is_rebuilt"),
    "segment_reads_before_itself": ("lib/data.py", "        if start < 0:  # before the segment",
                                    "        if False:  # before the segment",
                                    "tests/test_data.py::test_clips_of_unequal_length_are_walked_whole"),
    "signal_line_after_the_step": ("lib/terminal.py", "                if self.seen == 1:\n                    self.arrived(signum)",
                                   "                pass",
                                   "tests/test_ctrl_c.py::test_the_watcher_answers_while_one_torch_op_holds_the_main_thread"),
    "log_not_flushed": ("lib/run.py", "        sys.stdout.flush()  # a log redirected", "        pass  # a log redirected",
                        "tests/test_ctrl_c.py::test_the_first_signal_is_in_the_log_at_once_during_a_long_step"),
    "prime_on_every_row": ("two_tier.py", "            _, _, h = self.frame_rnn(x[:, :-fs].reshape(1, -1, fs), h[:, :1])\n"
                           "        return h.expand(-1, n, -1).contiguous(), x[:, -fs:].expand(n, -1).contiguous()",
                           "            x = x.expand(n, -1)\n            _, _, h = self.frame_rnn(x[:, :-fs].reshape(n, -1, "
                           "fs), h.expand(-1, n, -1).contiguous())\n        return h, x[:, -fs:]",
                           "tests/test_sample.py::test_priming_runs_the_recurrent_tiers_on_one_row_and_never_the_output"),
}


def copy_of_repo(tmp):
    copy = os.path.join(tmp, "repo")
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".cache"))
    return copy


def pytest(copy, tests):
    """Run the tests in the copy -> (exit status, the first failure's summary line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="220")  # wide: pytest cuts the summary to the terminal
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rfEs", "-p", "no:cacheprovider", *tests],
                       cwd=copy, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    why = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))] or lines[-1:] or [""]
    if p.returncode == 0 and " skipped" in (lines[-1:] or [""])[0]:  # a guard that skips guards nothing
        return 3, why[0][:160]
    return p.returncode, why[0][:160]


def run(name):
    path, text, replacement, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_of_repo(tmp)
        source = open(os.path.join(copy, path)).read()
        if source.count(text) != 1:
            return "stale (the text to mutate is not there once)"
        with open(os.path.join(copy, path), "w") as f:
            f.write(source.replace(text, replacement))
        code, why = pytest(copy, tests.split())
        return f"caught: {why}" if code == 1 else "SURVIVED" if code == 0 else f"error {code}: {why}"


def main(names):
    names = names or list(MUTATIONS)
    unknown = [name for name in names if name not in MUTATIONS]
    if unknown:
        print(f"error: no mutation named {', '.join(unknown)}; the names are in MUTATIONS at the top of {__file__}")
        return 2
    guards = sorted({t for name in names for t in MUTATIONS[name][3].split()})
    with tempfile.TemporaryDirectory() as tmp:  # the control: without a mutation every guard passes
        code, why = pytest(copy_of_repo(tmp), guards)
    if code != 0:
        print(f"the guards {'skip here' if code == 3 else 'fail'} without any mutation, so no result below would "
              f"mean anything: {why}")
        return 2
    print(f"control: the {len(guards)} guards pass unmutated")
    results = {name: run(name) for name in names}
    for name, result in results.items():
        print(f"{name:34s} {result}")
    return 0 if all(r.startswith("caught") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
