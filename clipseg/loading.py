"""Loading a model to run and the test-mode data it runs on, with one error policy.

A run name (a folder of `checkpoints/`), a checkpoint directory, a hub id or an original `.pth` resolves to one
source (`resolve_model`); `load_model` loads it with `CLIPSeg.from_pretrained`, in eval mode, on the device,
prepared for the precision (clipseg/precision.py), with the text cache on; `build_eval_dataset` reads the
test-mode split it is scored on. With `backend` onnx or openvino, `load_model` opens an export folder instead
(clipseg/backends.py). Whatever cannot be used raises `LoadError`, whose message names the source and
says what to do. score.py and failure_test.py load their models and data here.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

import dataset as datasets
from clipseg.backends import ExportUnusable, open_export
from clipseg.precision import prepare_model
from model import CLIPSeg

CHECKPOINTS_DIR = Path("checkpoints")
DATA_KINDS = ("phrasecut", "synthetic", "folder")


class LoadError(Exception):
    """A model, data set or option that cannot be used; the message says what to do."""


def available_runs(checkpoints_dir: Path = CHECKPOINTS_DIR) -> list[str]:
    """Names of the runs under `checkpoints_dir` that hold a saved model (`config.json`)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p.parent.name for p in checkpoints_dir.glob("*/config.json"))


def resolve_model(
    name: str | None, model: str | None, checkpoints_dir: Path = CHECKPOINTS_DIR, checkpoint: str | None = None
) -> tuple[str, Path | None]:
    """Where to load the model from and which directory its scores go to (None for hub ids and .pth files).

    name: a run under `checkpoints_dir`; model: a hub id, a checkpoint directory or an original `.pth`;
    checkpoint: a model inside the run or directory (`best`, `iter_005000`), default the run's latest."""
    if name is not None and model is not None:
        raise LoadError(f"give either a run NAME ({name}) or --model ({model}), not both")
    if name is None and model is None:
        raise LoadError("give a run NAME (a folder of checkpoints/) or --model HUB_ID_OR_DIR_OR_PTH")
    if name is None and checkpoint is None:
        local = Path(model)
        return model, local if (local / "config.json").is_file() else None
    run_dir = checkpoints_dir / name if name is not None else Path(model)
    directory = run_dir / checkpoint if checkpoint else run_dir
    if not (directory / "config.json").is_file():
        kept = sorted(p.parent.name for p in run_dir.glob("*/config.json"))
        if name is not None and not run_dir.is_dir():
            runs = available_runs(checkpoints_dir)
            listing = ", ".join(runs) if runs else "none yet (train one with train.py --name NAME)"
            raise LoadError(
                f"no trained model in {run_dir} (config.json missing). Runs in {checkpoints_dir}/: {listing}. "
                "For other weights use --model HUB_ID_OR_DIR_OR_PTH."
            )
        raise LoadError(
            f"no trained model in {directory} (config.json missing); models in {run_dir}: the latest"
            + (f", {', '.join(kept)}" if kept else "")
            + " (--checkpoint best exists once a run validates, see train.py --val-interval)"
        )
    return str(directory), directory


def load_model(
    source: str, backbone: str | None, device: str, precision: str = "fp32", backend: str = "torch"
) -> CLIPSeg:
    """`CLIPSeg.from_pretrained(source)` in eval mode on `device`, prepared for `precision` (clipseg/precision.py), with
    the text cache on; errors become `LoadError` naming the source. backend onnx or openvino: the export folder
    `source` in its runtime (clipseg/backends.py), which computes in its own precision (`precision` must be it)."""
    if backend != "torch":
        try:
            model = open_export(backend, source, precision)
        except ExportUnusable as err:
            raise LoadError(f"cannot load the export {source}: {err}") from err
        model.text_cache = {}
        return model
    try:
        model = CLIPSeg.from_pretrained(source, backbone=backbone)
    except (OSError, ValueError) as err:
        raise LoadError(f"cannot load the model {source}: {err}") from err
    model.eval().to(device)
    model.text_cache = {}
    return prepare_model(model, precision, device)


def input_side(model: CLIPSeg, requested: int | None) -> int:
    """--image-size, or the model's own, checked against the model's patch size."""
    try:
        return model.config.input_side(requested)
    except ValueError as err:
        raise LoadError(str(err)) from err


def default_data_root(kind: str) -> str:
    """Where a data kind is read from without --data-root (--data folder has no default)."""
    if kind == "phrasecut":
        return datasets.DEFAULT_PHRASECUT_ROOT
    if kind == "synthetic":
        return datasets.DEFAULT_SYNTHETIC_ROOT
    raise LoadError("--data folder needs --data-root INDEX_FILE (a JSONL or CSV of image, phrase, mask)")


def build_eval_dataset(
    kind: str, root: str | None, split: str, image_size: int, limit: int | None, resize: str = "original"
) -> Dataset:
    """The test-mode data set (whole images squashed to `image_size` by the `resize` rule, no negatives,
    original-size masks)."""
    root = root or default_data_root(kind)
    try:
        return datasets.build_dataset(kind, root, split, train=False, image_size=image_size, limit=limit, resize=resize)
    except (OSError, ValueError, KeyError) as err:
        raise LoadError(f"cannot read the {kind} data at {root} (split {split}): {err}") from err
