"""Every output path is checked before anything is written: a page or a plot replaces only a page or plot its
command wrote (else --overwrite), a run's own files are never an output, and a folder that cannot be written is
one line with nothing left behind."""
import os

import pytest

from conftest import run_main
from generate import main as generate_main
from lib.report import main as report_main
from test_resume import one_error
from test_train import snapshot, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, speech_wav):
    return train(tmp_path_factory.mktemp("outputs"), speech_wav, "--n_samples", "1", "--sample_secs", "0.05")


def unchanged(path):
    return open(path, "rb").read()


@pytest.mark.parametrize("flag", ["--html", "--plot"])
def test_report_never_replaces_a_file_it_did_not_write(tmp_path, run_dir, capsys, flag):
    settings = os.path.join(run_dir, "settings.json")
    notes = tmp_path / ("notes.md" if flag == "--html" else "notes.png")
    notes.write_text("my notes\n")
    for target in (settings, str(notes)):
        before = snapshot(run_dir), unchanged(target)
        assert run_main(report_main, [run_dir, flag, target]) == 2
        assert one_error(capsys).startswith(f"error: {flag} {target}")  # exists and is not ..., or not a .png
        assert (snapshot(run_dir), unchanged(target)) == before
    assert not os.path.exists(tmp_path / "notes_files")
    assert run_main(report_main, [run_dir, flag, str(notes), "--overwrite"]) == 0  # asked for
    assert notes.read_bytes() != b"my notes\n"
    if flag == "--plot":
        assert run_main(report_main, [run_dir, flag, str(tmp_path / "notes.md"), "--overwrite"]) == 2
        assert "name a .png, .pdf, .svg file" in one_error(capsys)


def test_report_rewrites_its_own_page_and_plot(tmp_path, run_dir):
    out, png = str(tmp_path / "compare.html"), str(tmp_path / "curves.png")
    for _ in range(2):
        assert run_main(report_main, [run_dir, "--html", out, "--plot", png]) == 0
    assert os.path.getsize(out) and os.path.getsize(png)


def test_report_html_into_a_folder_or_an_unwritable_place_is_one_line_and_leaves_nothing(tmp_path, run_dir, capsys):
    folder = tmp_path / "pages"
    folder.mkdir()
    assert run_main(report_main, [run_dir, "--html", str(folder)]) == 2
    assert f"--html {folder} is a folder: name a file" in one_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["pages"] and os.listdir(folder) == []
    # a folder that cannot be made (tests run as root, which writes into read-only folders: a file in the way)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert run_main(report_main, [run_dir, "--html", str(blocker / "out.html")]) == 1
    assert one_error(capsys).startswith(f"error: cannot write {blocker / 'out_files'}: Not a directory")


def test_generate_never_writes_its_page_over_a_runs_page_or_another_file(tmp_path, run_dir, capsys):
    before = snapshot(run_dir)
    assert run_main(generate_main, [run_dir, "--out", run_dir, "--n", "1", "--secs", "0.01"]) == 2
    assert f"--out {run_dir} is a run folder" in one_error(capsys)
    assert snapshot(run_dir) == before
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<html>my site</html>")
    assert run_main(generate_main, [run_dir, "--out", str(out), "--n", "1", "--secs", "0.01"]) == 2
    assert "exists and is not a page this command wrote" in one_error(capsys)
    assert os.listdir(out) == ["index.html"] and (out / "index.html").read_text() == "<html>my site</html>"
    mine = str(tmp_path / "mine")
    assert run_main(generate_main, [run_dir, "--out", mine, "--n", "1", "--secs", "0.01"]) == 0
    assert run_main(generate_main, [run_dir, "--out", mine, "--n", "1", "--secs", "0.01", "--seed", "1"]) == 0
    assert len([n for n in os.listdir(mine) if n.endswith(".wav")]) == 2
