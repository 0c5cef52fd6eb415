"""Folders of any size: the inputs walked as a stream, a summary line per image written as soon as it is done,
resuming a run that was cut short, and the ranks' summaries merged into one. predict.py runs folders through these.

Walking (`iter_inputs`): the inputs in the order given; a file as given, a folder's files with an image suffix
(`IMAGE_SUFFIXES`, any case; not recursive), and an `InputEntry` with an `error` for whatever cannot be read (missing,
a broken link, a symbolic-link loop, no permission, not a regular file, a folder that cannot be listed or holds no
images), counted and reported as a skip. Memory does not grow with the folder: `os.scandir` reads it a buffer at a
time and nothing is collected. The order within a folder is the file system's, which differs between file systems
and nodes; nothing depends on it. Sorting while walking would need a folder's whole listing in memory (a million
names take over 100 MB as Python strings), so the one sort is the summary's, at the merge, on disk. Sharding needs
no order (`owns`: a hash of each entry's key, clipseg/distributed.py). Duplicates: a folder given twice is walked
once, a file given twice is read once, and a file given on its own or reached through a symbolic link inside a
walked folder is left to that folder's walk (two links to one file outside the walked folders are two images).

Summary lines: each rank appends to `OUT/summary-rank<k>.jsonl` (`SummaryLog`) one JSON line per image, or per
skipped input ({"image": ..., "error": ...}), in one write, flushed to the operating system as soon as the image's
files are written: a killed process loses nothing written before, and a line cut short by the kill is cut off when
the file is opened again. `merge_summaries` folds `OUT/summary.jsonl` and the rank files into `OUT/summary.jsonl`:
sorted by image (code-point order of the key), each image once (its latest line), written atomically; the rank
files are then removed. Memory: at most `run_bytes` of lines (sorted runs on disk, then a k-way merge).

Resuming: an image is complete when its summary line is present (written after its files) and every file it should
have exists and is not empty; otherwise (killed before its line, a file missing or empty) it is done again.
`start_summaries(out, resume)`, on rank 0 before the other ranks read: `resume` folds the previous attempt's rank
files into summary.jsonl, whatever world size it ran with, so that lines written from then on supersede older ones;
a fresh run removes them. `CompletedImages.load` then keeps 8 bytes per completed image of this rank.

Output folders (`output_name`) are a function of the image's path alone, since a streamed run cannot look at the
other images to see whether two of them would share a name.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipseg.outputs import atomic_write, json_text, safe_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SUMMARY_NAME = "summary.jsonl"
RANK_SUMMARY = re.compile(r"summary-rank(\d+)\.jsonl")
SUMMARY_JSON_NAME = "summary.json"  # the run's summary, written from summary.jsonl at the end
STAMP_FIELD = "input_file"  # a summary line's record of its image file (`input_stamp`), for --resume
RUN_FILE = "run.json"  # the flags an output folder was made with (for --resume)
COCO_NAME = "coco.json"  # the run's COCO annotations, with --coco
KEY_FIELD = "image"  # a summary line's key: the image's path as given (or the skipped input's)
RUN_BYTES = 8 << 20  # lines sorted in memory at a time by merge_summaries
FAN_IN = 64  # sorted runs merged at a time (open files)


# ------------------------------------------------------------------------------------------------- walking


def stable_hash(key: str) -> int:
    """A 64-bit hash of an entry's key that is the same in every process, node and run (BLAKE2b of its UTF-8 bytes,
    surrogates of names that are not valid Unicode included): what shards streams over ranks
    (clipseg/distributed.py) and remembers completed images. Python's `hash()` is salted per process."""
    data = key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class InputEntry:
    """An image file to process, or (with `error`) an input that cannot be. `key`, its path as given (a folder's
    path joined with the file name), identifies it in sharding, summaries and resuming."""

    key: str
    error: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.key)


def unreadable_entry(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as an image file, or None for a regular file."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return None
        return "not a regular file"
    except FileNotFoundError:
        return "file not found" if not os.path.islink(path) else "broken symbolic link"
    except OSError as err:
        return f"cannot read ({err.strerror or err})"


def iter_inputs(inputs: Sequence[str], owns: Callable[[str], bool] | None = None) -> Iterator[InputEntry]:
    """The image files of `inputs` (files and folders) and the inputs that cannot be read, as a stream (see the
    module docstring). `owns(key)`: keep only this rank's entries, decided before anything about them is read.
    Per folder entry only strings are made (no `Path`, whose names Python interns)."""
    owns = owns or (lambda key: True)
    folders = {Path(item).resolve() for item in inputs if Path(item).is_dir()}
    walked, given = set(), set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if path.resolve() not in walked:
                walked.add(path.resolve())
                yield from _walk_folder(path, folders, owns)
            continue
        if not owns(str(path)):
            continue
        problem = unreadable_entry(path)
        if problem:
            yield InputEntry(str(path), problem)
        elif path.resolve() not in given and not _in_walked_folder(path, folders):
            given.add(path.resolve())
            yield InputEntry(str(path))


def _walk_folder(folder: Path, folders: set[Path], owns: Callable[[str], bool]) -> Iterator[InputEntry]:
    found, prefix = False, "" if str(folder) == "." else os.path.join(folder, "")  # keys as str(folder / name)
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if suffix(entry.name).lower() not in IMAGE_SUFFIXES:
                    continue
                found, key = True, prefix + entry.name
                if not owns(key):
                    continue
                problem = unreadable_entry(key)
                if problem:
                    yield InputEntry(key, problem)
                elif not (entry.is_symlink() and _in_walked_folder(Path(key), folders)):
                    yield InputEntry(key)
    except OSError as err:
        if owns(str(folder)):
            yield InputEntry(str(folder), f"cannot list the folder ({err.strerror or err})")
        return
    if not found and owns(str(folder)):
        yield InputEntry(str(folder), f"folder has no images ({', '.join(IMAGE_SUFFIXES)})")


def _in_walked_folder(path: Path, folders: set[Path]) -> bool:
    """Whether the file `path` leads to is itself an image of a folder that is walked (and is processed there)."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return target.parent in folders and target.suffix.lower() in IMAGE_SUFFIXES


def suffix(name: str) -> str:
    """`PurePath(name).suffix` of a file name, without making a path (a walk calls it per entry)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def output_name(path: Path, several_inputs: bool) -> str:
    """The output folder of an image: `safe_name` of its file name (cat.jpg and cat.png are two images), of its
    whole path as given when the run has several inputs (two folders may both hold a cat.jpg); hashed when that is
    the name of one of the run's own files (an image called summary.jsonl)."""
    name = safe_name(str(path) if several_inputs else path.name)
    return safe_name(name, hashed=True) if is_run_file(name) else name


def is_run_file(name: str) -> bool:
    """Whether `name` is that of a file the run writes in its output folder (besides the images' folders)."""
    return name in (SUMMARY_NAME, SUMMARY_JSON_NAME, RUN_FILE, COCO_NAME) or bool(RANK_SUMMARY.fullmatch(name))


# ------------------------------------------------------------------------------------------- summary lines


def rank_summary_path(out: Path, rank: int) -> Path:
    return out / f"summary-rank{rank}.jsonl"


def summary_line(record: dict) -> bytes:
    """A record as one strict JSON line in UTF-8 (non-ASCII kept; escaped where a name is not valid Unicode)."""
    try:
        return (json_text(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json_text(record) + "\n").encode("ascii")


class SummaryLog:
    """This rank's summary file, appended to one line per `write`; a line cut short by an earlier kill (no newline
    at the end) is cut off first. A write that fails (disk full) leaves the file as it was and raises."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        self.size = _cut_partial_line(self.fd)

    def write(self, record: dict) -> None:
        line = summary_line(record)
        data = memoryview(line)
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            os.ftruncate(self.fd, self.size)
            raise
        self.size += len(line)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SummaryLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_partial_line(fd: int) -> int:
    """Truncate the file after its last newline (to nothing when it has none); returns its size."""
    size = end = os.lseek(fd, 0, os.SEEK_END)
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
    return end


def read_summary(path: Path) -> Iterator[dict]:
    """The records of a summary file, skipping a last line cut short and lines that are not JSON records with an
    image key."""
    with open(path, "rb") as handle:
        for line in handle:
            record = _parse_line(line)
            if record is not None:
                yield record


def _parse_line(line: bytes) -> dict | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError too
        return None
    return record if isinstance(record, dict) and isinstance(record.get(KEY_FIELD), str) else None


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class MergeCounts:
    """What a merged summary holds: images done, inputs skipped (error lines), and the lines left out (older lines
    of an image done again, lines cut short or unreadable)."""

    images: int = 0
    errors: int = 0
    dropped: int = 0


def rank_summaries(out: Path) -> list[Path]:
    """The rank files in `out`, by rank."""
    found = [(int(m.group(1)), p) for p in out.glob("summary-rank*.jsonl") if (m := RANK_SUMMARY.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def merge_summaries(out: Path, run_bytes: int = RUN_BYTES) -> MergeCounts:
    """Fold `out/summary.jsonl` and the rank files into `out/summary.jsonl`, sorted by image, each image once (the
    line written last: the rank files' lines come after summary.jsonl's, each file's in its order), atomically;
    then remove the rank files. Memory: about `run_bytes` of lines (sorted runs on disk)."""
    final, ranks = out / SUMMARY_NAME, rank_summaries(out)
    sources = ([final] if final.exists() else []) + ranks
    for leftover in out.glob(".merge-*"):  # of a merge cut short by a kill
        shutil.rmtree(leftover)
    for leftover in out.glob(f".{SUMMARY_NAME}.*.tmp"):
        leftover.unlink()
    counts = MergeCounts()
    with tempfile.TemporaryDirectory(dir=out, prefix=".merge-") as scratch:
        runs = _sorted_runs(_keyed_lines(sources, counts), Path(scratch), run_bytes)
        while len(runs) > FAN_IN:  # the earliest runs first, so that later lines stay later
            merged = Path(scratch) / f"merged-{len(runs)}"
            _write_run(merged, heapq.merge(*map(_read_run, runs[:FAN_IN]), key=_run_key))
            runs = [merged, *runs[FAN_IN:]]
        atomic_write(final, lambda tmp: _write_latest(tmp, heapq.merge(*map(_read_run, runs), key=_run_key), counts))
    for path in ranks:
        path.unlink()
    return counts


def _keyed_lines(sources: Iterable[Path], counts: MergeCounts) -> Iterator[tuple[str, bool, bytes]]:
    """(key, is an error line, line) of every usable line, in order."""
    for path in sources:
        with open(path, "rb") as handle:
            for line in handle:
                record = _parse_line(line)
                if record is None:
                    counts.dropped += 1
                    continue
                yield record[KEY_FIELD], "error" in record, line


def _sorted_runs(lines: Iterator[tuple[str, bool, bytes]], scratch: Path, run_bytes: int) -> list[Path]:
    runs, buffer, size = [], [], 0
    for item in itertools.chain(lines, [None]):
        if item is not None:
            buffer.append(item)
            size += len(item[2])
        if buffer and (item is None or size >= run_bytes):
            buffer.sort(key=lambda entry: entry[0])  # stable: equal keys keep their order
            runs.append(scratch / f"run-{len(runs)}")
            _write_run(runs[-1], iter(buffer))
            buffer, size = [], 0
    return runs


def _write_run(path: Path, items: Iterator[tuple[str, bool, bytes]]) -> None:
    with open(path, "wb") as handle:
        for key, error, line in items:
            handle.write(json.dumps([key, error]).encode("ascii") + b"\t" + line)


def _read_run(path: Path) -> Iterator[tuple[str, bool, bytes]]:
    with open(path, "rb") as handle:
        for raw in handle:
            prefix, line = raw.split(b"\t", 1)  # the JSON prefix is ASCII with no raw tab
            key, error = json.loads(prefix.decode("ascii"))
            yield key, error, line


def _run_key(item: tuple[str, bool, bytes]) -> str:
    return item[0]


def _write_latest(path: str, items: Iterator[tuple[str, bool, bytes]], counts: MergeCounts) -> None:
    with open(path, "wb") as handle:
        for _, group in itertools.groupby(items, key=_run_key):
            *older, (_, error, line) = group
            handle.write(line)
            counts.dropped += len(older)
            counts.errors += error
            counts.images += not error


# ------------------------------------------------------------------------------------------------ resuming


def start_summaries(out: Path, resume: bool) -> MergeCounts | None:
    """Rank 0, before any rank reads or writes a summary: `resume` folds what earlier attempts wrote into
    summary.jsonl (returns its counts); a fresh run removes the old summary and rank files (returns None)."""
    if resume:
        return merge_summaries(out) if out.is_dir() else MergeCounts()
    for path in [out / SUMMARY_NAME, *rank_summaries(out)] if out.is_dir() else []:
        path.unlink(missing_ok=True)
    return None


class CompletedImages:
    """The images an earlier attempt finished (lines of summary.jsonl without an error), as sorted 64-bit hashes
    of their keys: 8 bytes per image. A hash shared by two keys (about 1 in 10^7 for a million images) is caught by
    the check of the files."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.sort(np.asarray(hashes, dtype=np.uint64))

    @classmethod
    def load(cls, out: Path, owns: Callable[[str], bool] | None = None) -> CompletedImages:
        """The completed images of out/summary.jsonl (after `start_summaries`) that `owns` keeps, each with the
        size and modification time its file had (`input_stamp`; lines older than the stamp have none)."""
        path = out / SUMMARY_NAME
        records = read_summary(path) if path.exists() else iter(())
        keys = (
            _stamped(r[KEY_FIELD], r.get(STAMP_FIELD))
            for r in records
            if "error" not in r and (owns is None or owns(r[KEY_FIELD]))
        )
        return cls(np.fromiter(map(stable_hash, keys), dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, key: str) -> bool:
        value = np.uint64(stable_hash(key))
        at = int(np.searchsorted(self.hashes, value))
        return at < len(self.hashes) and self.hashes[at] == value

    def is_complete(self, key: str, files: Iterable[Path], stamp: dict | None = None) -> bool:
        """Whether the image `key` needs no work: its line was written, for the file as it is now (`stamp`, from
        `input_stamp`: an image replaced since is done again), and each of `files` exists, not empty."""
        done = _stamped(key, stamp) in self or key in self  # the second: a line older than the stamps
        return done and all(_non_empty_file(path) for path in files)


def input_stamp(path: Path) -> dict | None:
    """What a summary line records of its image's file (STAMP_FIELD): its size and modification time, or None when
    it cannot be read."""
    try:
        info = path.stat()
    except OSError:
        return None
    return {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def _stamped(key: str, stamp: object) -> str:
    """The key a completed image is hashed under: with its file's stamp when there is one."""
    if not isinstance(stamp, dict):
        return key
    return f"{key}\0{stamp.get('bytes')}:{stamp.get('mtime_ns')}"


def _non_empty_file(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0
