"""python -m lib.download against a local fixture server (127.0.0.1 only; tests never touch the internet): the real
layouts in tiny archives, a transfer that breaks off and resumes, a wrong checksum, an archive with ../ paths."""
import hashlib
import http.server
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_main, speech
from lib.download import BEETHOVEN_ITEMS, main as download_main


def wav_bytes(seconds, rate, fmt="WAV", subtype="PCM_16", clip=0):
    audio = np.resize(speech(4.0, clip=clip), int(seconds * rate))
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


class Server:
    """Serves `files` {url path: bytes} with HTTP Range; the first `cuts` responses stop halfway."""

    def __init__(self):
        self.files, self.cuts, self.ranges, self.no_length = {}, 0, [], False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                server.ranges.append(start)
                self.send_response(206 if start else 200)
                if not server.no_length:  # else the end of the body is the end of the connection
                    self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cuts:
                    server.cuts -= 1
                    body = body[:len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *a):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def ljspeech_archive(extra=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as t:
        members = [(f"LJSpeech-1.1/wavs/LJ001-{i:04d}.wav", wav_bytes(1.5, 22050, clip=i % 5)) for i in range(6)]
        members += [("LJSpeech-1.1/metadata.csv", b"LJ001-0000|text|text\n"), *extra]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def fetch(tmp_path, name, url, *flags):
    return run_main(download_main, [name, str(tmp_path / "ds"), "--url", url, "--clip_secs", "0.5", *flags])


def test_ljspeech_downloads_resumes_and_prepares(tmp_path, server, capsys):
    archive = ljspeech_archive()
    server.files["/LJSpeech-1.1.tar.bz2"] = archive
    server.cuts = 1  # the first transfer breaks off halfway; the same run resumes it
    assert fetch(tmp_path, "ljspeech", server.url + "/LJSpeech-1.1.tar.bz2", "--sha256", sha(archive)) == 0
    assert server.ranges[0] == 0 and server.ranges[1] == len(archive) // 2  # resumed with HTTP Range
    meta = json.load(open(tmp_path / "ds" / "dataset.json"))
    assert meta["sample_rate"] == 16000 and sum(len(s["files"]) for s in meta["splits"].values()) == 6
    assert all(f.startswith("LJSpeech-1.1/wavs/") for s in meta["splits"].values() for f in s["files"])
    readme = open(tmp_path / "ds" / "README.md").read()
    assert "public domain" in readme and "Keith Ito" in readme
    assert "broke off" in capsys.readouterr().err
    assert os.listdir(tmp_path / "ds.download") == ["LJSpeech-1.1.tar.bz2"]  # the archive is kept, nothing else


def test_a_transfer_that_keeps_breaking_off_resumes_in_the_next_run(tmp_path, server, capsys):
    archive = ljspeech_archive()
    server.files["/a.tar.bz2"] = archive
    server.cuts = 10
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the download of") and "run the same command again" in err[-1]
    partial = os.path.getsize(tmp_path / "ds.download" / "LJSpeech-1.1.tar.bz2.part")
    assert 0 < partial < len(archive) and not (tmp_path / "ds").exists()
    server.cuts, server.ranges = 0, []
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 0
    assert server.ranges == [partial]  # picked up where the last run stopped


def test_wrong_checksum_and_unsafe_archives_are_refused(tmp_path, server, capsys):
    archive = ljspeech_archive()
    server.files["/a.tar.bz2"] = archive
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2") == 2  # the publisher's pinned SHA-256
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not be1a3045" in err[0] and "--sha256" in err[0]
    evil = ljspeech_archive(extra=[("LJSpeech-1.1/wavs/../../../evil.wav", b"x")])
    server.files["/evil.tar.bz2"] = evil
    assert fetch(tmp_path / "e", "ljspeech", server.url + "/evil.tar.bz2", "--sha256", sha(evil)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "a path outside the folder" in err[-1] and not (tmp_path / "evil.wav").exists()
    assert os.listdir(tmp_path / "e" / "ds.download") == ["LJSpeech-1.1.tar.bz2"]  # nothing was extracted


def test_vctk_keeps_microphone_1_of_the_chosen_speakers_and_file_urls_work(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for speaker in ("p225", "p226"):
            for k in range(4):
                for mic in (1, 2):
                    z.writestr(f"wav48_silence_trimmed/{speaker}/{speaker}_{k:03d}_mic{mic}.flac",
                               wav_bytes(1.0, 48000, "FLAC", clip=k))
        z.writestr("speaker-info.txt", "ID AGE\n")
    path = tmp_path / "VCTK-Corpus-0.92.zip"
    path.write_bytes(buf.getvalue())
    assert fetch(tmp_path, "vctk", path.as_uri(), "--sha256", sha(buf.getvalue()), "--speakers", "p226") == 0
    files = [f for s in json.load(open(tmp_path / "ds" / "dataset.json"))["splits"].values() for f in s["files"]]
    assert sorted(files) == [f"wav48_silence_trimmed/p226/p226_{k:03d}_mic1.flac" for k in range(4)]
    assert "CC-BY 4.0" in open(tmp_path / "ds" / "README.md").read()


def test_beethoven_fetches_every_item_checked_by_md5(tmp_path, server):
    for i, item in enumerate(BEETHOVEN_ITEMS):
        ogg = wav_bytes(0.6, 44100, "OGG", "VORBIS", clip=i % 5)
        name = f"{item}_movement 1.ogg"
        server.files[f"/metadata/{item}"] = json.dumps({"files": [
            {"name": name, "md5": hashlib.md5(ogg).hexdigest(), "size": str(len(ogg))},
            {"name": f"{item}.mp3", "md5": "0", "size": "1"}]}).encode()
        server.files[f"/download/{item}/{name.replace(' ', '%20')}"] = ogg
    assert fetch(tmp_path, "beethoven", server.url) == 0
    meta = json.load(open(tmp_path / "ds" / "dataset.json"))
    assert sum(len(s["files"]) for s in meta["splits"].values()) == 32


@pytest.mark.parametrize("argv, message", [
    (["mozart", "DEST"], "unknown dataset 'mozart'"),
    (["ljspeech", "FULL"], "already exists and is not empty"),
    (["ljspeech", "DEST", "--url", "http://127.0.0.1:9/LJSpeech-1.1.tar.bz2"], "cannot reach"),
    (["ljspeech", "DEST", "--speakers", "p225"], "--speakers applies to vctk only"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    os.makedirs(tmp_path / "FULL")
    (tmp_path / "FULL" / "keep.txt").write_text("precious")
    argv = [str(tmp_path / a) if a in ("DEST", "FULL") else a for a in argv]
    assert run_main(download_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert (tmp_path / "FULL" / "keep.txt").read_text() == "precious"


def test_a_mistyped_sha256_is_refused_before_anything_is_fetched(tmp_path, server, capsys):
    server.files["/a.tar.bz2"] = ljspeech_archive()
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", "xyz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a SHA-256 (64 hexadecimal digits)" in err[0]
    assert server.ranges == [] and not (tmp_path / "ds.download").exists()


def test_a_checksum_mismatch_keeps_the_archive_aside_and_says_how_to_use_it(tmp_path, server, capsys):
    archive = ljspeech_archive()
    server.files["/a.tar.bz2"] = archive
    wrong = "0" * 64
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", wrong) == 2
    err = capsys.readouterr().err.strip().splitlines()
    aside = tmp_path / "ds.download" / f"LJSpeech-1.1.tar.bz2.sha256-{sha(archive)[:12]}"
    assert len(err) == 1 and f"kept as {aside}" in err[0] and f"--sha256 {sha(archive)}" in err[0]
    assert aside.read_bytes() == archive  # the only copy is never deleted
    os.replace(aside, tmp_path / "ds.download" / "LJSpeech-1.1.tar.bz2")  # as the message says
    server.ranges = []
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 0
    assert server.ranges == []  # not fetched again


def test_a_transfer_without_a_length_that_is_cut_off_is_resumed(tmp_path, server, capsys):
    archive = ljspeech_archive()
    server.files["/a.tar.bz2"], server.no_length, server.cuts = archive, True, 1
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 2
    assert "may have been cut off; run the same command again to resume it" in capsys.readouterr().err
    part = tmp_path / "ds.download" / "LJSpeech-1.1.tar.bz2.part"
    assert part.read_bytes() == archive[:len(archive) // 2]
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 0
    assert server.ranges[-1] == len(archive) // 2


@pytest.mark.parametrize("content", [b"<html><body>503 Service Unavailable</body></html>", "truncated"])
def test_a_file_that_is_no_archive_is_one_line_and_leaves_no_extraction(tmp_path, server, capsys, content):
    data = ljspeech_archive()[:20000] if content == "truncated" else content
    server.files["/a.tar.bz2"] = data
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable archive" in err[0], err
    assert os.listdir(tmp_path / "ds.download") == ["LJSpeech-1.1.tar.bz2"] and not (tmp_path / "ds").exists()


def test_download_folder_problems_are_one_line(tmp_path, server, capsys):
    server.files["/a.tar.bz2"] = archive = ljspeech_archive()
    (tmp_path / "ds.download").write_text("a file where the download folder goes")
    assert fetch(tmp_path, "ljspeech", server.url + "/a.tar.bz2", "--sha256", sha(archive)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
    (tmp_path / "plain_file").write_text("x")  # a destination under a file: its download folder cannot be made
    code = run_main(download_main, ["ljspeech", str(tmp_path / "plain_file" / "ds"), "--url",
                                    server.url + "/a.tar.bz2", "--sha256", sha(archive)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: cannot write"), err


def test_a_full_disk_while_extracting_is_one_line_and_removes_the_extraction(tmp_path):
    archive = ljspeech_archive()
    os.makedirs(tmp_path / "ds.download")
    (tmp_path / "ds.download" / "LJSpeech-1.1.tar.bz2").write_bytes(archive)  # fetched before
    limit = 40_000  # bytes per file: less than one extracted WAV (66 kB), as a full disk would stop it

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    p = subprocess.run([sys.executable, "-m", "lib.download", "ljspeech", str(tmp_path / "ds"), "--sha256",
                        sha(archive), "--url", "file:///nonexistent"], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=limited, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot write")
    assert os.listdir(tmp_path / "ds.download") == ["LJSpeech-1.1.tar.bz2"] and not (tmp_path / "ds").exists()


def test_beethoven_metadata_without_sizes_works(tmp_path, server):
    for i, item in enumerate(BEETHOVEN_ITEMS):
        ogg = wav_bytes(0.6, 44100, "OGG", "VORBIS", clip=i % 5)
        server.files[f"/metadata/{item}"] = json.dumps({"files": [
            {"name": "a.ogg", "md5": hashlib.md5(ogg).hexdigest()}]}).encode()
        server.files[f"/download/{item}/a.ogg"] = ogg
    assert fetch(tmp_path, "beethoven", server.url) == 0


def test_a_beethoven_file_with_the_wrong_md5_is_refused_and_kept_aside(tmp_path, server, capsys):
    oggs = [wav_bytes(0.6, 44100, "OGG", "VORBIS", clip=i % 5) for i in range(len(BEETHOVEN_ITEMS))]
    for i, item in enumerate(BEETHOVEN_ITEMS):
        md5 = hashlib.md5(oggs[i] if i else b"another file").hexdigest()  # the first item's file is not it
        server.files[f"/metadata/{item}"] = json.dumps({"files": [{"name": "a.ogg", "md5": md5}]}).encode()
        server.files[f"/download/{item}/a.ogg"] = oggs[i]
    assert fetch(tmp_path, "beethoven", server.url) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has md5 {hashlib.md5(oggs[0]).hexdigest()}" in err[0] and "kept as" in err[0]
    assert not (tmp_path / "ds").exists()


def test_into_the_current_empty_folder_and_a_path_with_a_space(tmp_path, server, capsys, monkeypatch):
    """DEST '.' from an empty folder: the archive goes beside it (not into ./..download/, which made '.' no longer
    empty after the whole transfer), and the closing hint's --data pastes whole when the path has a space."""
    archive = ljspeech_archive()
    server.files["/LJSpeech-1.1.tar.bz2"] = archive
    here = tmp_path / "my data"
    os.makedirs(here)
    monkeypatch.chdir(here)
    url = ["--url", server.url + "/LJSpeech-1.1.tar.bz2", "--sha256", sha(archive), "--clip_secs", "0.5"]
    assert run_main(download_main, ["ljspeech", ".", *url]) == 0
    assert (here / "dataset.json").exists() and (tmp_path / "my data.download" / "LJSpeech-1.1.tar.bz2").exists()
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert run_main(download_main, ["ljspeech", "new set", *url]) == 0
    assert capsys.readouterr().out.strip().endswith("python two_tier.py --data 'new set'")
