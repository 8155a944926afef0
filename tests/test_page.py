"""The pages to listen with (lib/page.py): what a fresh run writes, lib.report --html for one run and for several,
generate.py's folder page, damaged folders; and each page as headless Chromium shows it (tests/browser.py, Selenium)."""
import glob
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from browser import find_chromium, look
from conftest import RATE, run_main, speech
from generate import main as generate_main
from lib import page
from lib.report import main as report_main
from test_train import train

SAMPLE_SECS = 0.25
N_SAMPLES, INTERVALS = 5, 12  # the "12 hourly intervals with 5 samples each", at tiny scale


def needs_chromium():
    """Chromium, or a skip saying how to install it; in CI (CI set) a failure instead: the check must run there."""
    found = find_chromium()
    if found is None:
        message = ("no chromium or chromedriver: install Debian's packages (apt-get install chromium chromium-driver) "
                   "to check the pages in a browser")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, speech_wav):
    """Two fresh tiny runs of INTERVALS intervals with N_SAMPLES samples each (seeds 1 and 2)."""
    tmp = tmp_path_factory.mktemp("pages")
    return [train(tmp, speech_wav, "--stop_iters", str(INTERVALS), "--print_iters", "1", "--n_samples", str(N_SAMPLES),
                  "--sample_secs", str(SAMPLE_SECS), "--seed", str(seed), runs=f"runs{seed}") for seed in (1, 2)]


def own_files_only(seen, *folders):
    """Every URL the page fetched is a file under one of `folders` (or the browser's own data: icons)."""
    roots = [os.path.realpath(f) + os.sep for f in folders]
    for url in seen["requests"]:
        assert url.startswith("data:") or (url.startswith("file://") and any(
            os.path.realpath(url[len("file://"):].replace("%20", " ")).startswith(r) for r in roots)), url


def heard_and_seen(seen, n_audio, secs):
    """Every audio element loaded with the right duration, every image loaded, no console error."""
    assert len(seen["audios"]) == n_audio
    for a in seen["audios"]:
        assert a["error"] is None and a["duration"] == pytest.approx(secs, abs=1 / RATE), a
    assert seen["images"] and all(i["width"] > 0 for i in seen["images"]), seen["images"]
    assert seen["errors"] == []


def test_the_browser_check_sees_what_a_person_would_miss(tmp_path):
    """The checks above can fail: a page with a console error, a failed assertion, a late exception, a missing
    image, a WAV that is not audio and an image from outside its folder is seen as such."""
    needs_chromium()
    folder, outside = tmp_path / "page", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    sf.write(folder / "half.wav", np.zeros(RATE // 2, np.float32), RATE)
    (folder / "broken.wav").write_bytes(b"not audio")
    page.write_spectrogram(str(folder / "half.wav"), str(outside / "elsewhere.png"))
    (folder / "index.html").write_text(
        '<!doctype html><title>faults</title><audio src="half.wav"></audio><audio src="broken.wav"></audio>'
        '<img src="../outside/elsewhere.png"><img src="missing.png"><table><tr><td>1</td></tr><tr><td>2</td></tr>'
        '</table><script>console.error("boom"); console.log("fine"); console.assert(false, "asserted");'
        'setTimeout(() => { throw new Error("late"); }, 10);</script>')
    seen = look(folder / "index.html")
    assert [(a["duration"], a["error"]) for a in seen["audios"]] == [(0.5, None), (None, 4)]  # 4: not supported
    assert [i["width"] > 0 for i in seen["images"]] == [True, False] and seen["tables"] == [2]
    for error in ("boom", "asserted", "late", "missing.png"):
        assert sum(error in e for e in seen["errors"]) == 1, (error, seen["errors"])
    assert not any("fine" in e for e in seen["errors"])
    own_files_only(seen, folder.parent)
    with pytest.raises(AssertionError, match="elsewhere.png"):
        own_files_only(seen, folder)


def test_a_fresh_run_writes_its_page_with_every_interval_and_sample(runs):
    run_dir = runs[0]
    index = os.path.join(run_dir, "index.html")
    text = open(index).read()
    wavs = sorted(glob.glob(os.path.join(run_dir, "samples", "*.wav")))
    assert len(wavs) == INTERVALS * N_SAMPLES
    for wav in wavs:  # each sample has its player and its spectrogram, linked relatively
        assert os.path.exists(page.spectrogram_path(wav))
        name = os.path.basename(wav)
        assert f'src="samples/{name}"' in text and f'src="samples/{name[:-4]}.png"' in text
    assert "file://" not in text and "http" not in text and "<script" not in text
    # newest interval first, the best one marked
    shown = [int(m) for m in re.findall(r"<h3>iteration (\d+)", text)]
    assert shown == list(range(INTERVALS, 0, -1))
    assert text.count('<tr class="best">') == 1 and "(best)" in text


def test_the_run_page_in_a_browser(runs, tmp_path):
    needs_chromium()
    copy = shutil.copytree(runs[0], tmp_path / "copied run")  # copied whole (a space in the path, too)
    seen = look(os.path.join(copy, "index.html"), screenshot=tmp_path / "run.png")
    heard_and_seen(seen, INTERVALS * N_SAMPLES, SAMPLE_SECS)
    assert len(seen["images"]) == INTERVALS * N_SAMPLES + 1  # the spectrograms and the curves
    assert seen["tables"][-1] == INTERVALS + 1  # the metrics table: a header and a row per interval
    own_files_only(seen, copy)


def test_the_comparison_page_in_a_browser(runs, tmp_path, capsys):
    needs_chromium()
    out = str(tmp_path / "compare.html")
    assert run_main(report_main, [*runs, "--html", out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    seen = look(out, screenshot=tmp_path / "compare.png")
    heard_and_seen(seen, 1 + 2 * INTERVALS * N_SAMPLES, SAMPLE_SECS)  # the data's clip, then both runs'
    assert seen["tables"][0] == 3  # the report's table: a header and a row per run
    assert seen["tables"][-1] == INTERVALS + 1  # the samples: a row per interval
    own_files_only(seen, tmp_path, *runs)


def test_generate_writes_a_page_for_its_folder(runs, tmp_path):
    out = str(tmp_path / "generated")
    assert run_main(generate_main, [runs[0], "--n", "2", "--secs", "0.5", "--out", out, "--plot_softmax"]) == 0
    assert run_main(generate_main, [runs[0], "--n", "1", "--secs", "0.5", "--out", out, "--seed", "9"]) == 0
    text = open(os.path.join(out, "index.html")).read()
    assert text.count("<audio") == 3 and "seed9_temp1_000.wav" in text and "_softmax.png" in text
    if find_chromium() or os.environ.get("CI"):
        needs_chromium()
        seen = look(os.path.join(out, "index.html"))
        heard_and_seen(seen, 3, 0.5)
        own_files_only(seen, out)


def test_a_damaged_or_unfinished_run_still_gets_its_page_with_one_warning_per_missing_piece(runs, tmp_path, capsys):
    run_dir = shutil.copytree(runs[1], tmp_path / "damaged")
    samples = os.path.join(run_dir, "samples")
    os.remove(os.path.join(samples, "it0000003_2.wav"))  # a missing sample
    os.remove(os.path.join(samples, "it0000004_0.png"))  # a missing spectrogram: made again
    for png in glob.glob(os.path.join(samples, "it0000005_*.png")):
        os.remove(png)
    with open(os.path.join(samples, "it0000005_1.wav"), "wb") as f:  # a WAV that is not audio
        f.write(b"not audio")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:  # a half-written row (a run still training)
        f.write('{"iteration": 13, "train_se')
    os.remove(os.path.join(run_dir, "index.html"))
    assert run_main(report_main, [str(run_dir), "--html"]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines) and "Traceback" not in err
    assert sum("it0000003_2.wav" in line for line in lines) == 1
    assert sum("it0000005_1.wav" in line for line in lines) >= 1
    assert sum("line 13" in line for line in lines) == 1
    assert os.path.exists(os.path.join(samples, "it0000004_0.png"))
    text = open(os.path.join(run_dir, "index.html")).read()
    assert "it0000003_2.wav" not in text and "it0000003_1.wav" in text
    if find_chromium() or os.environ.get("CI"):
        needs_chromium()
        seen = look(os.path.join(run_dir, "index.html"))
        # the broken WAV is on the page (it exists) and fails to play; everything else loads
        broken = [a for a in seen["audios"] if a["src"].endswith("it0000005_1.wav")]
        assert len(broken) == 1 and broken[0]["error"] is not None
        rest = dict(seen, audios=[a for a in seen["audios"] if a not in broken],
                    errors=[e for e in seen["errors"] if "it0000005_1" not in e])
        heard_and_seen(rest, INTERVALS * N_SAMPLES - 2, SAMPLE_SECS)


def test_a_run_without_samples_or_metrics_gets_a_page(tmp_path, speech_wav, capsys):
    run_dir = train(tmp_path, speech_wav, "--stop_iters", "2", "--print_iters", "1", "--n_samples", "0")
    assert "No samples yet" in open(os.path.join(run_dir, "index.html")).read()
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    assert run_main(report_main, [run_dir, "--html"]) == 0
    assert "No interval has ended yet" in open(os.path.join(run_dir, "index.html")).read()
    assert "Traceback" not in capsys.readouterr().err


def test_spectrograms_are_small_and_drawn_on_one_scale(tmp_path):
    """A real clip's spectrogram: 128 rows, a column per hop, low frequencies at the bottom; a 2 s 8 kHz PNG is a
    fraction of its WAV's size, and digital silence is the floor colour, not an error."""
    audio = speech(2.0)
    wav, silent = str(tmp_path / "speech.wav"), str(tmp_path / "silence.wav")
    sf.write(wav, audio, RATE, subtype="PCM_16")
    sf.write(silent, np.zeros(RATE), RATE, subtype="PCM_16")
    db = page.spectrogram(audio, RATE)
    assert db.shape == (page.SPECTROGRAM_ROWS, 2 * RATE // 64 + 1)
    # speech has most of its energy below 1 kHz: the bottom rows are louder than the top ones
    assert np.mean(db[-32:]) > np.mean(db[:32]) + 10
    assert page.make_spectrograms([wav, silent]) == [wav, silent]
    assert os.path.getsize(page.spectrogram_path(wav)) < 0.5 * os.path.getsize(wav)
    from PIL import Image
    image = Image.open(page.spectrogram_path(silent))
    assert image.size == (RATE // 64 + 1, page.SPECTROGRAM_ROWS) and set(np.asarray(image).ravel()) == {0}
