"""The OpenVINO conversion of a PyTorch model, made once per model and kept: where OpenVINO is the fastest measured
path (`clipseg.precision.default_path`), predict.py and app.py run a model given as PyTorch weights (a hub id, a
run, a .pth) in OpenVINO by converting it on first use (`export_openvino`: the ONNX graphs, OpenVINO, int8
calibrated on the shipped examples, the accuracy check against PyTorch fp32) into a cache folder, and later runs open
the cached folder, checked like any export (manifest, SHA-256 of each file, the check's record).

    folder = cached_export(model, "int8", source="CIDAS/clipseg-rd64-refined")   # Path; ConversionFailed otherwise

The cache: $CLIPSEG_CACHE, else $XDG_CACHE_HOME/clipseg, else ~/.cache/clipseg; each conversion in
openvino/<key>, where the key is the SHA-256 of the model's config and weights, the precision, the conversion code
(clipseg/onnx/openvino_export.py's text), the openvino and nncf versions and the CPU's class (AMX, VNNI, neither)
and native bf16: a change to any of them converts again. The recipe a conversion keeps and its accuracy check depend
on the CPU's kernels (int8 products without VNNI can saturate where VNNI's do not), so a cache shared by machines of
different classes (a home folder on a cluster's network file system) holds one conversion per class.

Finding the key means loading the PyTorch model (2.5 s at ViT-B/16, more than OpenVINO then takes for a few images),
so each conversion found or made for a model given by its files is also recorded under those files' identity
(`source_key`: their paths, sizes, modification and change times, and the same versions and CPU), in
sources/<source key>.json: a later run whose files have not changed opens the conversion without loading PyTorch
(`recorded_conversion`). A changed file (any write changes its change time) misses the record, and that run takes the
long way again. The graphs of a conversion, once compiled for the CPU, are kept too, in compiled/
(`compiled_graphs`; about as large as the conversion), and imported by later runs (0.5 s instead of 1.5 s at
ViT-B/16 int8).

A conversion is written to a temporary folder beside its place and renamed into it when complete, so a crash or two
processes converting at once never leave a half folder under the key. A conversion whose accuracy check failed is
recorded (<key>.failed.json, with the reason) so that later runs fall back at once instead of converting again;
delete the record to try again.

Each new version of clipseg, openvino or nncf converts again, so whenever a conversion is made the cache is pruned
(`prune_conversions`): conversions not opened for `UNUSED_DAYS` days go (opening one touches its folder), with the
records that lead to them and folders a crash left half converted; compiled graphs are pruned likewise when one is
kept (`openvino_compiled.prune_unused`). A line on stderr says what was removed. Deleting the whole cache folder is
always safe: it only costs the conversions again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipseg.config import DEFAULT_BACKBONE, RANDOM_BACKBONES
from clipseg.onnx.backend import MANIFEST_NAME, SHA256
from clipseg.onnx.openvino_compiled import (
    MAX_RECORD_BYTES,
    UNFINISHED_HOURS,
    UNUSED_DAYS,
    mark_used,
    older_than,
    remove,
)
from clipseg.outputs import read_regular, write_json
from clipseg.precision import cpu_class
from clipseg.weights import DECODER_WEIGHTS_NAME, read_config
from model import CLIPSeg

CACHE_VARIABLE = "CLIPSEG_CACHE"
CONVERSION_CODE = Path(__file__).with_name("openvino_export.py")


class ConversionFailed(RuntimeError):
    """The model could not be converted to OpenVINO here (or its conversion failed before): the message says why."""


def cache_root() -> Path:
    """$CLIPSEG_CACHE, else $XDG_CACHE_HOME/clipseg, else ~/.cache/clipseg."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipseg"


def compiled_graphs() -> Path:
    """The folder where the graphs compiled for this CPU are kept, the cached conversions' and those of export folders
    the commands run (`clipseg.onnx.openvino_compiled`: importing them takes a third of the time of compiling them)."""
    return cache_root() / "openvino" / "compiled"


def conversion_key(model: CLIPSeg, precision: str) -> str:
    """SHA-256 over what a conversion depends on: the model's config (not the folder its CLIP weights were read from:
    a copy of the model elsewhere is the same model) and weights (names, dtypes, shapes, values), and
    `conversion_setting(precision)`."""
    digest = hashlib.sha256()
    config = model.config.to_hf_dict()
    config.pop("clipseg_clip_source", None)  # where the weights were read from: the same model copied elsewhere
    header = {"config": config, **conversion_setting(precision)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # hashed in place, not copied
    return digest.hexdigest()


def conversion_setting(precision: str) -> dict:
    """What a conversion depends on besides the model: the precision, the conversion code, the openvino and nncf
    versions, the CPU's class (`precision.cpu_class`) and whether OpenVINO computes bf16 natively. nncf's version
    comes from its package metadata: importing nncf takes over a second, which a cache hit would pay for nothing."""
    import openvino

    from clipseg.onnx.openvino_backend import openvino_bf16

    return {
        "precision": precision,
        "openvino": openvino.__version__,
        "nncf": importlib.metadata.version("nncf"),  # PackageNotFoundError (an ImportError) without it
        "code": hashlib.sha256(CONVERSION_CODE.read_bytes()).hexdigest(),
        "cpu": {"class": cpu_class(), "native_bf16": openvino_bf16()},
    }


MAX_SOURCE_FILES = 256  # a folder with more files than this is not keyed by its files (the long way is taken)


def source_files(source: str, backbone: str | None = None, depth: int = 2) -> list[Path] | None:
    """The files `CLIPSeg.from_pretrained(source, backbone)` reads, as far as they can be told without loading: every
    file of the checkpoint's folder (a hub id's: its snapshot in the HF cache, whose links lead to the files), and
    those of the CLIP weights that a decoder-only checkpoint or an original .pth decoder takes. None when they
    cannot be told (a random backbone is drawn anew on every load; an unreadable or very large folder)."""
    if depth == 0:
        return None
    path = Path(source)
    if path.suffix in (".pth", ".pt") and path.is_file():
        backbone = backbone or DEFAULT_BACKBONE
        clip = None if backbone in RANDOM_BACKBONES else source_files(backbone, None, depth - 1)
        return None if clip is None else [path, *clip]
    try:
        stored, config_path = read_config(source)
        files = [p for p in Path(config_path).parent.iterdir() if p.is_file()]
    except (OSError, ValueError):
        return None
    if len(files) > MAX_SOURCE_FILES:
        return None
    if stored.get("clipseg_weights") == DECODER_WEIGHTS_NAME:
        clip_source = stored.get("clipseg_clip_source")
        clip = source_files(clip_source, None, depth - 1) if isinstance(clip_source, str) else None
        return None if clip is None else [*files, *clip]
    return files


def source_key(source: str, backbone: str | None, precision: str) -> str | None:
    """SHA-256 over the identity of the files `source` loads from (`source_files`: each one's resolved path, size,
    modification and change times, device and inode) and `conversion_setting(precision)`: the same while none of
    the files is written, moved or replaced. None when the files cannot be told."""
    files = source_files(source, backbone)
    if files is None:
        return None
    identities = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            return None
        times = [stat.st_mtime_ns, stat.st_ctime_ns]
        identities.append([str(file.resolve()), stat.st_size, *times, stat.st_dev, stat.st_ino])
    header = {"files": sorted(identities), "backbone": backbone, **conversion_setting(precision)}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def recorded_conversion(key: str | None) -> Path | None:
    """The cached conversion recorded for the source key `key` (`remember_conversion`), or None. The record is
    untrusted: only a key of the cache's own form is followed, and only to a complete conversion (the folder is
    checked again when it is opened)."""
    if key is None:
        return None
    conversion = recorded_name(cache_root() / "openvino" / "sources" / f"{key}.json")
    if conversion is None:
        return None
    folder = cache_root() / "openvino" / conversion
    if not (folder / MANIFEST_NAME).is_file():
        return None
    mark_used(folder)
    return folder


def recorded_name(record: Path) -> str | None:
    """The conversion (its key) a source record leads to, or None when it is not a record `remember_conversion`
    writes: only a key of the cache's own form is followed."""
    try:
        conversion = json.loads(read_regular(record, MAX_RECORD_BYTES)).get("conversion")
    except (OSError, ValueError, AttributeError):
        return None
    return conversion if isinstance(conversion, str) and SHA256.fullmatch(conversion) else None


def remember_conversion(key: str, folder: Path, source: str) -> None:
    """Record that the source key `key` converts to `folder` (a conversion in the cache); written whole or not at all.
    A cache that cannot be written only means the next run finds the conversion the long way."""
    try:
        write_json(folder.parent / "sources" / f"{key}.json", {"conversion": folder.name, "source": source})
    except OSError:
        pass


def say_cached(precision: str, source: str, folder: Path) -> None:
    """The line on stderr that says a run uses a cached conversion."""
    print(f"OpenVINO {precision}: the conversion of {source or 'the model'} cached in {folder}", file=sys.stderr)


def failure_reason(record: Path) -> str:
    """The reason a failure record gives; a record that cannot be read or parsed says so instead (still a failure:
    delete it to try again)."""
    try:
        reason = json.loads(read_regular(record, MAX_RECORD_BYTES)).get("reason")
    except (OSError, ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) else "the record cannot be read"


def cached_export(model: CLIPSeg, precision: str, source: str = "", source_key: str | None = None) -> Path:
    """The folder of `model`'s OpenVINO conversion in `precision` (`export_openvino`, default calibration and bar),
    converted now unless the cache holds it, and recorded under `source_key` (the `source_key` of the files the
    model was loaded from, taken before loading it) when one is given. Prints one line on stderr saying which.
    Raises ConversionFailed when the model cannot be converted (not a CLIPSeg, its accuracy check fails, the cache
    cannot be written), also when an earlier conversion of the same key failed."""
    folder = _cached_export(model, precision, source)
    if source_key is not None:
        remember_conversion(source_key, folder, source)
    return folder


def _cached_export(model: CLIPSeg, precision: str, source: str) -> Path:
    from clipseg.onnx.openvino_export import AccuracyCheckFailed, export_openvino

    if type(model) is not CLIPSeg:
        raise ConversionFailed(f"{type(model).__name__} models are not converted to OpenVINO (CLIPSeg only)")
    root = cache_root() / "openvino"
    key = conversion_key(model, precision)
    folder, failed = root / key, root / f"{key}.failed.json"
    if (folder / MANIFEST_NAME).is_file():
        mark_used(folder)
        say_cached(precision, source, folder)
        return folder
    if failed.is_file():
        raise ConversionFailed(
            f"its OpenVINO {precision} conversion failed before ({failure_reason(failed)}; recorded in {failed})"
        )
    print(
        f"OpenVINO {precision}: converting {source or 'the model'} for this CPU, once (a few minutes at ViT-B/16), "
        f"into {folder}; --backend torch skips it",
        file=sys.stderr,
        flush=True,
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=root))
    except OSError as err:
        raise ConversionFailed(f"the cache {root} cannot be written ({err}); set {CACHE_VARIABLE}") from err
    try:
        export_openvino(model, work, precision, source=source)
        os.replace(work, folder)
    except Exception as err:  # any failure of the conversion falls back to PyTorch; the reason is reported
        shutil.rmtree(work, ignore_errors=True)
        if (folder / MANIFEST_NAME).is_file():  # another process finished the same conversion first
            return folder
        if isinstance(err, AccuracyCheckFailed):
            failed.write_text(json.dumps({"reason": str(err), "source": source, "precision": precision}))
        raise ConversionFailed(f"its OpenVINO {precision} conversion failed: {err}") from err
    prune_conversions(root, keep=key)
    return folder


def prune_conversions(root: Path, keep: str, now: float | None = None) -> list[Path]:
    """Remove from the cache's `root` (<cache>/openvino) the conversions but `keep` not opened for UNUSED_DAYS days,
    the folders of conversions a crash interrupted more than UNFINISHED_HOURS ago, and the source records whose
    conversion is gone; says so on stderr and returns the paths removed. Anything else is left alone."""
    now = time.time() if now is None else now
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    stale = []
    for path in entries:
        if path.is_symlink() or not path.is_dir() or path.name == keep:
            continue
        key, partial, _ = path.name.partition(".partial-")
        if SHA256.fullmatch(key) and partial and older_than(path, UNFINISHED_HOURS * 3600, now):
            stale.append(path)
        elif SHA256.fullmatch(path.name) and older_than(path, UNUSED_DAYS * 86400, now):
            stale.append(path)
    removed = remove(stale, f"cached conversions unused for {UNUSED_DAYS} days or left by a crash", root)
    records = [record for record in sorted((root / "sources").glob("*.json")) if SHA256.fullmatch(record.stem)]
    gone = [record for record in records if (name := recorded_name(record)) and not (root / name).is_dir()]
    return removed + remove(gone, "records of conversions no longer cached", root / "sources")
