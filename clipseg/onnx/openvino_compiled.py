"""OpenVINO graphs compiled for this CPU, kept in a folder and imported by later runs instead of compiled again: the
four graphs of a ViT-B/16 int8 export took 1.5 s to compile on an AMD EPYC (AVX512-VNNI) and 0.5 s to import. The
commands keep them in the cache's compiled/ folder (`clipseg.onnx.openvino_cache.compiled_graphs`), for the cache's
conversions and for export folders given with --backend openvino alike.

    key = compiled_key(core, graph_digests, {"precision": "int8", "threads": None})
    compiled = import_compiled(core, folder, key)                 # None: not kept, or not usable
    keep_compiled(folder, key, core.compile_model(model, "CPU", config), config)

A compiled graph is kept as <key>.blob with <key>.json beside it: the blob's SHA-256 and the options it was
compiled with, which its import repeats (OpenVINO otherwise applies its defaults at import, e.g. bf16 where f32 was
compiled: the text encoder's outputs then moved by 0.09). The key covers the graph's files (their SHA-256s), what
its options were derived from, the openvino version and the CPU (OpenVINO's name for it and the instruction sets
torch detects): a graph compiled on one CPU is never imported on another. Kept graphs are untrusted: a blob without
the recorded SHA-256, a record that is not one `keep_compiled` writes, or a blob OpenVINO refuses is compiled again
and replaced.

Every version of openvino or of an export makes new keys, so the folder is pruned whenever a graph is kept there:
graphs not imported for `UNUSED_DAYS` days (an import touches the record) and files a crash left half written are
removed, with a line on stderr (`prune_unused`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clipseg.onnx.backend import SHA256
from clipseg.outputs import atomic_write, read_regular, write_json

if TYPE_CHECKING:  # openvino is optional: imported where it is used
    from openvino import CompiledModel, Core

MAX_RECORD_BYTES = 1 << 20
MAX_BLOB_BYTES = 16 << 30  # a ViT-B/16 int8 conversion compiles to 224 MB
# The options `compile_config` gives, and the values an import accepts from a record.
OPTIONS = {
    "INFERENCE_PRECISION_HINT": ("f32", "bf16"),
    "PERFORMANCE_HINT": ("LATENCY",),
    "INFERENCE_NUM_THREADS": int,
}


def compiled_key(core: Core, graph_digests: Sequence[str], asked: dict) -> str:
    """SHA-256 over a compiled graph's identity: its files' SHA-256s, `asked` (what its compile options come from,
    e.g. the export's precision and the threads), the openvino version and the CPU."""
    import openvino

    from clipseg.precision import cpu_capabilities

    identity = {
        "graph": list(graph_digests),
        "asked": asked,
        "openvino": openvino.__version__,
        "cpu": {"name": core.get_property("CPU", "FULL_DEVICE_NAME"), "capabilities": cpu_capabilities()},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def recorded_options(record: object) -> dict | None:
    """The compile options of a record, or None unless it is a dict of known options with values they take."""
    if not isinstance(record, dict) or not isinstance(options := record.get("options"), dict):
        return None
    for name, value in options.items():
        allowed = OPTIONS.get(name)
        if allowed is None:
            return None
        if allowed is int:
            if type(value) is not int or value < 1:
                return None
        elif value not in allowed:
            return None
    return options


def import_compiled(core: Core, folder: Path, key: str) -> CompiledModel | None:
    """The compiled graph kept under `key` in `folder`, imported with the options it was compiled with; None when
    there is none or it cannot be used (see the module's docstring)."""
    try:
        record = json.loads(read_regular(folder / f"{key}.json", MAX_RECORD_BYTES))
        data = read_regular(folder / f"{key}.blob", MAX_BLOB_BYTES)
    except (OSError, ValueError):
        return None
    options = recorded_options(record)
    digest = record.get("sha256") if isinstance(record, dict) else None
    if options is None or not isinstance(digest, str) or not SHA256.fullmatch(digest):
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        compiled = core.import_model(io.BytesIO(data), "CPU", options)
    except Exception:  # OpenVINO's errors for a blob it cannot use: compiled again by the caller
        return None
    mark_used(folder / f"{key}.json")
    return compiled


def keep_compiled(folder: Path, key: str, compiled: CompiledModel, options: dict) -> None:
    """Keep `compiled` (compiled with `options`) in `folder` under `key`, each file written whole or not at all (the
    record last). A folder that cannot be written only means the next run compiles again."""
    stream = io.BytesIO()
    try:
        compiled.export_model(stream)
    except Exception:  # a graph OpenVINO cannot export is compiled on every run, as without this folder
        return
    data = stream.getvalue()
    try:
        atomic_write(folder / f"{key}.blob", lambda tmp: Path(tmp).write_bytes(data))
        write_json(folder / f"{key}.json", {"sha256": hashlib.sha256(data).hexdigest(), "options": options})
    except OSError:
        return
    prune_unused(folder, keep=[key])


UNUSED_DAYS = 14  # a kept graph or cached conversion not used for this long is removed when a new one is kept
UNFINISHED_HOURS = 24  # a file or folder still being written after this long was left by a crash


def mark_used(path: Path) -> None:
    """Set `path`'s modification time to now: when it was last used, which pruning reads."""
    with contextlib.suppress(OSError):  # a read-only cache is never pruned either
        os.utime(path)


def older_than(path: Path, seconds: float, now: float) -> bool:
    """Whether `path` was last modified more than `seconds` before `now` (False when it cannot be told)."""
    try:
        return now - path.lstat().st_mtime > seconds
    except OSError:
        return False


def remove(paths: Iterable[Path], what: str, folder: Path) -> list[Path]:
    """Remove `paths` (files, or folders with everything under them) and say on stderr how many (`what` they are)
    and how many bytes went from `folder`; returns those removed. One that cannot be removed stays."""
    removed, freed = [], 0
    for path in paths:
        tree = path.is_dir() and not path.is_symlink()
        files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] if tree else [path]
        size = sum(file.lstat().st_size for file in files if file.exists())
        try:
            shutil.rmtree(path) if tree else path.unlink()
        except OSError:
            continue
        removed.append(path)
        freed += size
    if removed:
        print(f"removed {len(removed)} {what} ({freed / 1e6:.0f} MB) from {folder}", file=sys.stderr)
    return removed


def prune_unused(folder: Path, keep: Sequence[str] = (), now: float | None = None) -> list[Path]:
    """Remove from `folder` the compiled graphs (<key>.blob with <key>.json, timed by the record, which an import
    touches) not used for UNUSED_DAYS days, but those of the keys `keep`, and the blobs without a record and
    temporary files older than UNFINISHED_HOURS (a crash while keeping one). Other files are left alone."""
    now = time.time() if now is None else now
    unused, unfinished = UNUSED_DAYS * 86400, UNFINISHED_HOURS * 3600
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    stale = []
    for path in entries:
        key, _, suffix = path.name.partition(".")
        if key in keep or path.is_symlink() or not path.is_file():
            continue
        if not key and suffix.endswith(".tmp"):  # atomic_write's temporary file: .<name>.<random>.tmp
            stale += [path] if older_than(path, unfinished, now) else []
        elif SHA256.fullmatch(key) and suffix == "json" and older_than(path, unused, now):
            stale += [path.with_suffix(".blob"), path]  # the blob first: a record never outlives its blob
        elif SHA256.fullmatch(key) and suffix == "blob" and not path.with_suffix(".json").exists():
            stale += [path] if older_than(path, unfinished, now) else []
    what = f"compiled graph files unused for {UNUSED_DAYS} days or left by a crash"
    return remove([path for path in stale if path.exists()], what, folder)
