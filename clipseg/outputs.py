"""Writing results to disk: atomically, as strict JSON, to paths checked up front, under file names that cannot
leave their folder, with printable labels.

Every script writes through these helpers, so a kill never leaves a half-written file, no JSON holds NaN or
Infinity (which JSON does not have), an output path that cannot be written is found before any work is done, no
phrase or task id can name a path outside the output folder, and no control character reaches a picture or a log
line. `read_regular` is their counterpart for reading a file the program wrote earlier (a cache, an export) that
anyone may have replaced since: only a regular file of a bounded size is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# A name is used verbatim only if it is this plain (PhraseCut task ids such as "2345__101_102" are).
PLAIN_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,119}")
HASHED_NAME = re.compile(r"[a-z0-9_-]{1,60}~[0-9a-f]{12}")  # the form safe_name gives every other text
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)`, flush the file to disk and rename it over `path`: a crash at any moment
    leaves either the old file or the new one, never a partial one. The file gets the mode `open()` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600, and so does safetensors, which replaces the file
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path` (symbolic links followed) of at most `max_bytes`; an OSError saying
    why for anything else: a FIFO is not waited on, a device (/dev/zero) not read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise OSError(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} expected")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(info.st_size + 1)
    finally:
        os.close(fd)
    if len(data) > info.st_size:
        raise OSError(f"{path}: it grew while it was read")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_text(value: object, **options: Any) -> str:
    """`json.dumps(value, **options)`, strict: NaN and +-Infinity are not JSON, so a value holding one raises a
    ValueError naming where it is (a value that may legitimately be undefined must be None, i.e. null). Lone
    surrogates (a file name that is not UTF-8, as Python decodes it) are written as \\uXXXX escapes also with
    ensure_ascii=False, so the text can be written as UTF-8 and reads back to the same name."""
    try:
        return LONE_SURROGATE.sub(_escaped, json.dumps(value, allow_nan=False, **options))
    except ValueError as err:
        where = _non_finite_at(value, "value")
        if where is None:
            raise
        raise ValueError(f"{where} is not a finite number: JSON has no NaN or Infinity") from err


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def _non_finite_at(value: object, where: str) -> str | None:
    """The path (`value['key'][3]`) of the first NaN or infinite float in nested dicts, lists and tuples."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _non_finite_at(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def write_json(path: str | os.PathLike, value: object, indent: int | None = 2) -> None:
    """`atomic_write` of a strict JSON file (`json_text`: no NaN or Infinity; UTF-8, non-ASCII kept, trailing
    newline)."""
    write_text(path, json_text(value, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """An exclusive flock on `path`, a folder or a lock file (made if missing), held for the `with` block and
    released if the process dies; with `wait` False, LockHeld when another process holds it. No lock where the OS
    has no flock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise LockHeld(f"{path} is locked by another process") from err
        yield
    finally:
        os.close(handle)


class LockHeld(OSError):
    """`exclusive_lock(path, wait=False)` found the lock held by another process."""


class UnwritableOutput(OSError):
    """An output path that cannot be written; the message names it and says why."""


def check_writable(
    path: str | os.PathLike, folder: bool = False, needed_bytes: int = 0, what: str = "the output"
) -> None:
    """Raise `UnwritableOutput` unless the file `path` (or, with `folder=True`, the folder `path`) can be written
    and its disk has `needed_bytes` free (`what` names the output in that message): scripts call this before any
    work, so that a bad output path costs nothing. A 4 KiB probe file is written, flushed to disk and removed;
    missing folders are created for the probe and removed again."""
    path = Path(path)
    directory = path if folder else path.parent
    if not folder and path.is_dir():
        raise UnwritableOutput(f"cannot write {path}: it is a folder (give a file name)")
    missing = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
    blocking = next((d for d in (directory, *directory.parents) if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        raise UnwritableOutput(f"cannot write {path}: {blocking} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(directory).free
    except OSError as err:
        reason = err.strerror or str(err)
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise UnwritableOutput(f"cannot write {path}: {reason}{where}") from err
    finally:
        for created in missing:
            try:
                created.rmdir()
            except OSError:
                break
    if free < needed_bytes:
        raise UnwritableOutput(
            f"not enough disk space for {path}: {what} needs about {needed_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )


def safe_name(text: str, hashed: bool = False) -> str:
    """A file-name stem for any text (a task id, a prompt, an image name) that cannot leave its folder.

    Plain text (lowercase ASCII letters, digits, '_', '.', '-', at most 120 characters, not starting with '.' or
    '-', not a reserved Windows device name) is kept verbatim: PhraseCut's interchange format names prediction PNGs
    `<task_id>.png`. Any other text becomes an ASCII slug + '~' + 12 hex digits of its SHA-1, so distinct texts never
    share a name (a plain name has no '~'), also on case-insensitive file systems. hashed: the slug form even for
    plain text (a name a caller keeps for itself)."""
    if not hashed and PLAIN_NAME.fullmatch(text) and text.split(".")[0] not in WINDOWS_RESERVED:
        return text
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text).strip("-")[:60].strip("-") or "x"
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}~{digest}"


def is_safe_name(stem: str) -> bool:
    """True for the stems `safe_name` produces (never a path)."""
    return bool(PLAIN_NAME.fullmatch(stem) or HASHED_NAME.fullmatch(stem))


def printable(text: str, limit: int = 90) -> str:
    """One line of at most `limit` characters for a picture or a log: control characters and line breaks become
    spaces, and a longer text is cut with an ellipsis."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
