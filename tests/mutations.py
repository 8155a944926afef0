"""Named mutations: each puts one realistic bug into a copy of the repository and runs the test that guards the
claim it breaks; the test must fail ("caught"). Outside CI (minutes). notes/testing.md keeps the last result.

    python tests/mutations.py            # all
    python tests/mutations.py floor_not_round temperature_times
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
    "cache_without_lock": ("lib/cache.py", "fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
                           "tests/test_cache.py::test_two_builds_at_once_build_once_and_both_read_the_right_samples"),
    "resume_ignores_changed_data": ("lib/run.py", "    if not change:\n        return", "    return",
                                    "tests/test_resume.py::test_resume_refuses_changed_data_and_says_what_changed"),
    "run_not_locked": ("lib/run.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
                       "tests/test_resume.py::test_a_second_process_on_a_training_run_is_refused_naming_the_first"),
    "resume_loses_h": ("lib/session.py", "h = None if ckpt[\"h\"] is None else ckpt[\"h\"][:, s.batches.rows].to(s.device)",
                       "h = None", "tests/test_train.py::test_resume_continues_exactly"),
    "interval_accounting_off_by_one": ("lib/train.py", "interval[\"steps\"] += 1\n    state[\"iteration\"] += 1",
                                       "interval[\"steps\"] += 1 if state[\"iteration\"] else 2\n    "
                                       "state[\"iteration\"] += 1",
                                       "tests/test_fingerprint.py::test_a_fixed_seed_run_computes_what_it_did"),
    "page_links_absolute": ("lib/page.py", 'return quote(os.path.relpath(path, page_dir).replace(os.sep, "/"))',
                            'return "file://" + quote(os.path.abspath(path))',
                            "tests/test_page.py::test_the_run_page_in_a_browser"),
    "page_not_rewritten": ("lib/train.py", "    page.write_run_page(s.run_dir, quiet=True)", "    pass",
                           "tests/test_page.py::test_a_fresh_run_writes_its_page_with_every_interval_and_sample"),
    "threetier_kernel_reads_ahead": ("lib/kernels.py", "x_in[r, j] = reals[win[r, s - fs + j]]",
                                     "x_in[r, j] = reals[win[r, s + j - 1]]",
                                     "tests/test_sample.py::test_fast_path_equals_reference"),
}


def run(name):
    path, text, replacement, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".cache"))
        source = open(os.path.join(copy, path)).read()
        if source.count(text) != 1:
            return "stale (the text to mutate is not there once)"
        with open(os.path.join(copy, path), "w") as f:
            f.write(source.replace(text, replacement))
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                           cwd=copy, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return "caught" if p.returncode == 1 else "SURVIVED" if p.returncode == 0 else f"error {p.returncode}"


def main(names):
    results = {name: run(name) for name in names or MUTATIONS}
    for name, result in results.items():
        print(f"{name:32s} {result}")
    return 0 if all(r == "caught" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
