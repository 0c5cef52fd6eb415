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
A conversion is written to a temporary folder beside its place and renamed into it when complete, so a crash or two
processes converting at once never leave a half folder under the key. A conversion whose accuracy check failed is
recorded (<key>.failed.json, with the reason) so that later runs fall back at once instead of converting again;
delete the record to try again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from clipseg.onnx.backend import MANIFEST_NAME
from clipseg.precision import cpu_class
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


def conversion_key(model: CLIPSeg, precision: str) -> str:
    """SHA-256 over what a conversion depends on: the model's config and weights (names, dtypes, shapes, values),
    the precision, the conversion code, the openvino and nncf versions and the CPU (`precision.cpu_class`, and
    whether OpenVINO computes bf16 natively). nncf's version comes from its package metadata: importing nncf takes
    over a second, which a cache hit would pay for nothing."""
    import openvino

    from clipseg.onnx.openvino_backend import native_bf16

    digest = hashlib.sha256()
    header = {
        "config": model.config.to_hf_dict(),
        "precision": precision,
        "openvino": openvino.__version__,
        "nncf": importlib.metadata.version("nncf"),  # PackageNotFoundError (an ImportError) without it
        "code": hashlib.sha256(CONVERSION_CODE.read_bytes()).hexdigest(),
        "cpu": {"class": cpu_class(), "native_bf16": native_bf16()},
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # hashed in place, not copied
    return digest.hexdigest()


def failure_reason(record: Path) -> str:
    """The reason a failure record gives; a record that cannot be read or parsed says so instead (still a failure:
    delete it to try again)."""
    try:
        reason = json.loads(record.read_text()).get("reason")
    except (OSError, ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) else "the record cannot be read"


def cached_export(model: CLIPSeg, precision: str, source: str = "") -> Path:
    """The folder of `model`'s OpenVINO conversion in `precision` (`export_openvino`, default calibration and bar),
    converted now unless the cache holds it. Prints one line on stderr saying which. Raises ConversionFailed when
    the model cannot be converted (not a CLIPSeg, its accuracy check fails, the cache cannot be written), also when
    an earlier conversion of the same key failed."""
    from clipseg.onnx.openvino_export import AccuracyCheckFailed, export_openvino

    if type(model) is not CLIPSeg:
        raise ConversionFailed(f"{type(model).__name__} models are not converted to OpenVINO (CLIPSeg only)")
    root = cache_root() / "openvino"
    key = conversion_key(model, precision)
    folder, failed = root / key, root / f"{key}.failed.json"
    if (folder / MANIFEST_NAME).is_file():
        print(f"OpenVINO {precision}: the conversion of {source or 'the model'} cached in {folder}", file=sys.stderr)
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
    return folder
