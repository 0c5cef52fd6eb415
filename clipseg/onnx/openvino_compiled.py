"""OpenVINO graphs compiled for this CPU, kept in a folder and imported by later runs instead of compiled again: the
four graphs of a ViT-B/16 int8 export took 1.5 s to compile on an AMD EPYC (AVX512-VNNI) and 0.5 s to import. The
conversions of the cache (`clipseg.onnx.openvino_cache`) keep theirs in its compiled/ folder.

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
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

from clipseg.onnx.backend import SHA256
from clipseg.outputs import atomic_write, write_json

# The options `compile_config` gives, and the values an import accepts from a record.
OPTIONS = {
    "INFERENCE_PRECISION_HINT": ("f32", "bf16"),
    "PERFORMANCE_HINT": ("LATENCY",),
    "INFERENCE_NUM_THREADS": int,
}


def compiled_key(core, graph_digests: Sequence[str], asked: dict) -> str:
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


def import_compiled(core, folder: Path, key: str):
    """The compiled graph kept under `key` in `folder`, imported with the options it was compiled with; None when
    there is none or it cannot be used (see the module's docstring)."""
    try:
        record = json.loads((folder / f"{key}.json").read_text())
        data = (folder / f"{key}.blob").read_bytes()
    except (OSError, ValueError):
        return None
    options = recorded_options(record)
    digest = record.get("sha256") if isinstance(record, dict) else None
    if options is None or not isinstance(digest, str) or not SHA256.fullmatch(digest):
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        return core.import_model(io.BytesIO(data), "CPU", options)
    except Exception:  # OpenVINO's errors for a blob it cannot use: compiled again by the caller
        return None


def keep_compiled(folder: Path, key: str, compiled, options: dict) -> None:
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
        pass
