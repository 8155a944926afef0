"""Fetch a standard corpus and prepare it: python -m lib.download NAME DEST [--sample_rate 16000]

  ljspeech   LJSpeech 1.1: 24 hours, one speaker reading non-fiction, 22.05 kHz; public domain
  vctk       VCTK 0.92: 44 hours, 110 speakers of English, 48 kHz (microphone 1 only); CC-BY 4.0;
             --speakers p225,p226 keeps some of them
  beethoven  the music set of the SampleRNN paper: Beethoven's 32 piano sonatas, public-domain recordings on the
             Internet Archive (the items its download script fetches), OGG

The archive (or the files) go to DEST.download/, and a transfer that breaks off is resumed from where it stopped,
by this run (3 tries) or by running the same command again (HTTP Range). Each archive is checked against its size
and the publisher's SHA-256 (pinned here, as torchaudio's dataset classes pin them), each Internet Archive file
against the MD5 in the item's metadata. Archives are extracted safely (no member outside the folder, no links),
then python -m lib.prepare makes DEST (mono, --sample_rate, 8-second clips, a train/valid/test split by file),
and DEST/README.md records the origin, licence and credit. The extracted files are removed afterwards; the
archive is kept in DEST.download/ (delete it when DEST is made, or keep it to prepare again at another rate).

--url points at a mirror or a local copy (file:// too), for machines that cannot reach the publisher, with
--sha256 for a copy that is not byte-identical to the publisher's archive. For beethoven, --url replaces
https://archive.org (a mirror of its /metadata/ITEM and /download/ITEM/FILE paths).
"""
import hashlib
import http.client
import json
import lzma
import os
import re
import shlex
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib

if __name__ == "__main__":  # before the slow imports: Ctrl-C while they load is one line, not a traceback
    from lib.cli import quiet_interrupts
    quiet_interrupts("interrupted; run the same command again to resume the download")

from tqdm import tqdm

from lib import UserError, WriteError
from lib.cli import ArgumentParser, run_script
from lib.prepare import prepare

TRIES = 3  # per file, each resuming where the last broke off
UNKNOWN_LENGTH = set()  # files fetched without a Content-Length (and no size known)
BLOCK = 1 << 20  # bytes per read
BEETHOVEN_ITEMS = (
    "BeethovenPianoSonataNo.1 BeethovenPianoSonataNo.2 BeethovenPianoSonataNo.3 BeethovenPianoSonataNo.4 "
    "BeethovenPianoSonataNo.5 BeethovenPianoSonataNo.6 BeethovenPianoSonataNo.7 BeethovenPianoSonataNo.8 "
    "BeethovenPianoSonataNo.9 BeethovenPianoSonataNo.10 BeethovenPianoSonataNo.11 BeethovenPianoSonataNo.12 "
    "BeethovenPianoSonata13 BeethovenPianoSonataNo.14moonlight BeethovenPianoSonata15 BeethovenPianoSonata16 "
    "BeethovenPianoSonata17 BeethovenPianoSonataNo.18 BeethovenPianoSonataNo.19 BeethovenPianoSonataNo.20 "
    "BeethovenPianoSonataNo.21Waldstein BeethovenPianoSonata22 BeethovenPianoSonataNo.23 BeethovenPianoSonataNo.24 "
    "BeethovenPianoSonataNo.25 BeethovenPianoSonataNo.26 BeethovenPianoSonataNo.27 BeethovenPianoSonataNo.28 "
    "BeethovenPianoSonataNo.29 BeethovenPianoSonataNo.30 BeethovenPianoSonataNo.31 BeethovenPianoSonataNo.32").split()
DATASETS = {
    "ljspeech": dict(
        url="https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2",
        sha256="be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5",
        keep=lambda name: name.startswith("LJSpeech-1.1/wavs/") and name.endswith(".wav"),
        title="LJSpeech 1.1 (Keith Ito and Linda Johnson, 2017), https://keithito.com/LJ-Speech-Dataset/",
        licence="public domain (the texts and the LibriVox recordings)",
        credit="Keith Ito and Linda Johnson, The LJ Speech Dataset, 2017; readings from LibriVox"),
    "vctk": dict(
        url="https://datashare.is.ed.ac.uk/bitstream/handle/10283/3443/VCTK-Corpus-0.92.zip",
        sha256="f96258be9fdc2cbff6559541aae7ea4f59df3fcaf5cf963aae5ca647357e359c",
        keep=lambda name: name.startswith("wav48_silence_trimmed/") and name.endswith("_mic1.flac"),
        title="CSTR VCTK Corpus 0.92 (University of Edinburgh), https://datashare.ed.ac.uk/handle/10283/3443",
        licence="Creative Commons Attribution 4.0 International (CC-BY 4.0)",
        credit="Junichi Yamagishi, Christophe Veaux and Kirsten MacDonald, CSTR VCTK Corpus: English Multi-speaker "
               "Corpus for CSTR Voice Cloning Toolkit (version 0.92), University of Edinburgh, CSTR, 2019"),
    "beethoven": dict(
        url="https://archive.org", items=BEETHOVEN_ITEMS,
        title="Beethoven's 32 piano sonatas, recordings on the Internet Archive (the items listed by the SampleRNN "
              "paper's download script, github.com/soroushmehr/sampleRNN_ICLR2017, datasets/music)",
        licence="public domain recordings (as published on the Internet Archive; see each item's page)",
        credit="the performers and uploaders of the Internet Archive items " + ", ".join(BEETHOVEN_ITEMS)),
}


def fetch(url, path, size=None):
    """Download url to path, resuming path + '.part' with HTTP Range; -> path. Tries TRIES times, then a UserError
    that says to run again (the partial file is kept)."""
    part = path + ".part"
    for attempt in range(1, TRIES + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = have and getattr(response, "status", 200) == 206
                length = response.headers.get("Content-Length")
                total = (have if resumed else 0) + int(length) if length else size
                with open(part, "ab" if resumed else "wb") as f, \
                        tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                             desc=os.path.basename(path), disable=None) as bar:
                    while block := response.read(BLOCK):
                        f.write(block)
                        bar.update(len(block))
            got = os.path.getsize(part)
            if total and got != total:
                raise http.client.IncompleteRead(b"", total - got)
            if not total:  # no length given: only the checksum can tell a whole file from one cut off
                UNKNOWN_LENGTH.add(path)
            os.replace(part, path)
            return path
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the range starts at the end: the file is complete
                os.replace(part, path)
                return path
            raise UserError(f"{url}: HTTP {e.code} {e.reason}: check the URL, or pass --url with a mirror") from None
        except urllib.error.URLError as e:
            raise UserError(f"cannot reach {url} ({e.reason}): check the network, or pass --url with a mirror or "
                            f"a local copy (file://...)") from None
        except (http.client.HTTPException, OSError) as e:  # the transfer broke off
            if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)) and e.errno:
                raise WriteError(part, e) from None  # a local write failed (disk full)
            got = os.path.getsize(part) if os.path.exists(part) else 0
            print(f"warning: the transfer of {url} broke off at {got:,} bytes (try {attempt} of {TRIES})",
                  file=sys.stderr)
    raise UserError(f"the download of {url} keeps breaking off ({got:,} bytes so far, kept in {part}): run the "
                    f"same command again to resume it")


def file_hash(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def verify(path, algorithm, expected, hint):
    """The file against its checksum. On a mismatch nothing is deleted (it may be the only good copy of a file
    whose checksum was mistyped): a transfer of unknown length goes back to .part, to be resumed; any other file
    is kept aside, and the message says how to use it."""
    got = file_hash(path, algorithm)
    if got == expected.lower():
        return
    if path in UNKNOWN_LENGTH:
        os.replace(path, path + ".part")
        raise UserError(f"{path} does not match its {algorithm} yet: the server gave no length, so the transfer may "
                        f"have been cut off; run the same command again to resume it")
    aside = f"{path}.{algorithm}-{got[:12]}"
    os.replace(path, aside)
    use = f"pass --sha256 {got}" if algorithm == "sha256" else "it is not fetched or checked again"
    raise UserError(f"{path} has {algorithm} {got}, not {expected}: kept as {aside}; {hint} (if you trust that copy, "
                    f"rename it back: {use})")


def safe_name(name):
    """A member name that stays inside the extraction folder, or None."""
    parts = name.replace("\\", "/").split("/")
    return None if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] else "/".join(parts)


def extract(archive, out, keep):
    """The members `keep` selects, into out; refuses an archive with a member outside out, or a link, and one that
    cannot be read (an error page saved under the archive's name, a truncated file) with one line. The caller
    removes `out` afterwards, whatever happened."""
    try:
        extract_members(archive, out, keep)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"{archive} is not a readable archive ({str(e).splitlines()[0][:80] or type(e).__name__}): it "
                        f"may be cut short or another file; delete it and run again, or check --url") from None
    except OSError as e:  # bz2 raises OSError for bad data, as a full disk does
        if e.errno is None:
            raise UserError(f"{archive} is not a readable archive ({e}): delete it and run again") from None
        raise WriteError(out, e) from None


def extract_members(archive, out, keep):
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            check_members(archive, [(m.filename, False) for m in members])
            for m in tqdm([m for m in members if keep(m.filename)], desc="extracting", unit="file", disable=None):
                z.extract(m, out)
        return
    with tarfile.open(archive) as t:
        members = t.getmembers()
        check_members(archive, [(m.name, m.issym() or m.islnk() or m.isdev()) for m in members])
        chosen = [m for m in members if m.isfile() and keep(m.name)]
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4: a second guard
        t.extractall(out, members=tqdm(chosen, desc="extracting", unit="file", disable=None), **safety)


def check_members(archive, members):
    for name, is_link in members:
        if safe_name(name) is None or is_link:
            raise UserError(f"{archive} holds {'a link' if is_link else 'a path outside the folder'} ({name}): "
                            f"refused, nothing was extracted from it")


def download(name, dest, sample_rate=16000, url=None, sha256=None, speakers=None, clip_secs=8.0):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UserError(f"{dest} already exists and is not empty: choose a new folder (nothing was changed)")
    if speakers and name != "vctk":
        raise UserError("--speakers applies to vctk only")
    if sha256 and name == "beethoven":
        raise UserError("--sha256 applies to one archive; beethoven's files are checked against archive.org's MD5s")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--sha256 {sha256!r} is not a SHA-256 (64 hexadecimal digits): nothing was fetched")
    spec = DATASETS[name]
    work = os.path.abspath(dest).rstrip(os.sep) + ".download"  # beside DEST, never in it (DEST '.' is the folder)
    raw = os.path.join(work, "extracted")
    if os.path.exists(work) and not os.path.isdir(work):
        raise UserError(f"{work} exists and is not a folder (downloads go there): move it away")
    shutil.rmtree(raw, ignore_errors=True)  # a half-done extraction of an earlier run
    try:
        os.makedirs(raw, exist_ok=True)
    except OSError as e:
        raise WriteError(raw, e) from None
    try:
        meta = fetch_and_prepare(name, spec, dest, work, raw, sample_rate, url, sha256, speakers, clip_secs)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
        if not os.listdir(work):  # nothing was fetched: leave no trace
            os.rmdir(work)
    hours = sum(s["minutes"] for s in meta["splits"].values()) / 60
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write(f"# {name}\n\nOrigin: {spec['title']}\n\nLicence: {spec['licence']}\n\nCredit: {spec['credit']}\n\n"
                f"Made by `python -m lib.download {name} {shlex.quote(dest)} --sample_rate {sample_rate} --clip_secs {clip_secs:g}"
                f"{' --speakers ' + speakers if speakers else ''}` from {url or spec['url']}: "
                f"{hours:.2f} hours at {sample_rate} Hz, mono, 16-bit FLAC clips; the split is in dataset.json.\n")
    print(f"dataset {dest} is ready: python two_tier.py --data {shlex.quote(dest)}")
    return meta


def fetch_and_prepare(name, spec, dest, work, raw, sample_rate, url, sha256, speakers, clip_secs):
    """The files into work/, the chosen ones into raw/, then lib.prepare into dest."""
    if name == "beethoven":
        fetch_items(url or spec["url"], spec["items"], work, raw)
    else:
        archive = os.path.join(work, os.path.basename(spec["url"]))
        if not os.path.exists(archive):
            fetch(url or spec["url"], archive)
        verify(archive, "sha256", sha256 or spec["sha256"],  # every time: a kill may have come before the check
               "pass --sha256 HEX for a copy that differs from the publisher's archive" if url else
               "run the command again")
        keep = spec["keep"]
        if speakers:
            wanted = {s.strip() for s in speakers.split(",")}
            keep = (lambda inner: lambda n: inner(n) and n.split("/")[1] in wanted)(keep)
        extract(archive, raw, keep)
    return prepare(raw, dest, sample_rate=sample_rate, clip_secs=clip_secs)


def fetch_items(base, items, work, raw):
    """Every OGG file of the Internet Archive items, checked against the MD5 of the item's metadata."""
    for item in tqdm(items, desc="items", unit="item", disable=None):
        meta_path = os.path.join(work, f"{item}.json")
        if not os.path.exists(meta_path):
            fetch(f"{base}/metadata/{item}", meta_path)
        try:
            files = json.load(open(meta_path))["files"]
            if not all(isinstance(e, dict) and "name" in e and "md5" in e for e in files):
                raise ValueError("a file without a name or an MD5")
        except (ValueError, KeyError, TypeError):
            os.remove(meta_path)
            raise UserError(f"{base}/metadata/{item} is not an Internet Archive item's metadata: check --url") from None
        for entry in files:
            if entry["name"].endswith(".ogg") and safe_name(entry["name"]):
                path = os.path.join(work, item, entry["name"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if not os.path.exists(path):
                    size = int(entry["size"]) if str(entry.get("size", "")).isdigit() else None
                    fetch(f"{base}/download/{item}/{urllib.request.quote(entry['name'])}", path, size)
                    verify(path, "md5", entry["md5"], "run the command again")
                os.makedirs(os.path.join(raw, item), exist_ok=True)
                try:  # a hard link: no second copy on disk
                    os.link(path, os.path.join(raw, item, os.path.basename(path)))
                except OSError:
                    shutil.copyfile(path, os.path.join(raw, item, os.path.basename(path)))


def build_parser():
    p = ArgumentParser(prog="python -m lib.download", description=__doc__)
    p.add_argument("name", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("dest", help="new folder for the prepared dataset (must not exist or be empty)")
    p.add_argument("--sample_rate", type=int, default=16000, help="sample rate of the prepared dataset (Hz)")
    p.add_argument("--clip_secs", type=float, default=8.0, help="clip length of the prepared dataset (seconds)")
    p.add_argument("--url", default=None, help="a mirror or local copy (file://...) instead of the publisher")
    p.add_argument("--sha256", default=None, metavar="HEX", help="the checksum of a --url copy that differs from "
                   "the publisher's archive")
    p.add_argument("--speakers", default=None, help="vctk: comma-separated speakers to keep, e.g. p225,p226")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_script(download, args.name, args.dest, args.sample_rate, args.url, args.sha256, args.speakers, args.clip_secs)


if __name__ == "__main__":
    main()
