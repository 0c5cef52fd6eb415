"""Writing results to disk: atomically, under file names that cannot leave their folder, with printable labels,
into folders checked to be writable before the work starts.

Every script writes through these helpers, so a kill never leaves a half-written file, no phrase or task id can
name a path outside the output folder, and no control character reaches a picture or a log line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path

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


def check_writable_dir(directory: str | os.PathLike, needed_bytes: int = 0, what: str = "the output") -> None:
    """Fail before work whose results would be lost: OSError saying why when `directory` cannot be created or
    written (a 4 KiB file is written, flushed to disk and removed) or has less than `needed_bytes` free."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise OSError(f"cannot write to {directory}: {err.strerror or err}") from err
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise OSError(
            f"not enough disk space in {directory}: {what} needs about {needed_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free"
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value: object, indent: int | None = 2) -> None:
    """`atomic_write` of a JSON file (UTF-8, non-ASCII kept, trailing newline)."""
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def safe_name(text: str) -> str:
    """A file-name stem for any text (a task id, a prompt, an image name) that cannot leave its folder.

    Plain text (lowercase ASCII letters, digits, '_', '.', '-', at most 120 characters, not starting with '.' or
    '-', not a reserved Windows device name) is kept verbatim: PhraseCut's interchange format names prediction PNGs
    `<task_id>.png`. Any other text becomes an ASCII slug + '~' + 12 hex digits of its SHA-1, so distinct texts never
    share a name (a plain name has no '~'), also on case-insensitive file systems."""
    if PLAIN_NAME.fullmatch(text) and text.split(".")[0] not in WINDOWS_RESERVED:
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
