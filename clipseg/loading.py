"""Loading a model to run and the test-mode data it runs on, with one error policy for every command.

What `--model` names resolves to one source (`resolve_model`), the same way in every command that loads a model
(score.py, failure_test.py, predict.py, app.py, export.py, train.py --init): a run name (a folder of
`--checkpoints-dir`, default `checkpoints/`), a run or checkpoint directory, a hub id (OWNER/NAME) or an original
`.pth` decoder (with `--backbone`); `--checkpoint best|iter_NNNNNN` picks a model inside a run or directory. Without
`--model` every command loads `DEFAULT_MODEL`, the released weights. `load_model` loads the source with
`CLIPSeg.from_pretrained`, in eval mode, on the device, prepared for the precision (clipseg/precision.py), with the
text cache on; `build_eval_dataset` reads the test-mode split it is scored on. Whatever cannot be used raises
`LoadError`, whose message names the source and says what to do; the commands turn it into `error: <message>` and
exit status 2 (clipseg/cli.py). With `backend` onnx or openvino, `load_model` opens the export folder `--model` names
instead, in its runtime and its own precision (clipseg/backends.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch.utils.data import Dataset

import dataset as datasets
from clipseg.backends import ExportUnusable, open_export
from clipseg.onnx.backend import ExportedCLIPSeg
from clipseg.precision import prepare_model
from model import CLIPSeg

CHECKPOINTS_DIR = Path("checkpoints")
DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"  # the released weights: every command's model without --model
DATA_KINDS = ("phrasecut", "synthetic", "folder")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # a folder of --checkpoints-dir: no '/', no '..'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # OWNER/NAME; other paths must exist
ORIGINAL_SUFFIXES = (".pth", ".pt")  # the original repository's decoder weights
HUB_HINT = (
    " (a hub id is fetched once, with network access and HF_HUB_OFFLINE unset; or give --model a run name, a "
    "directory or a .pth)"
)


class LoadError(Exception):
    """A model, data set or option that cannot be used; the message says what to do."""


def available_runs(checkpoints_dir: Path = CHECKPOINTS_DIR) -> list[str]:
    """Names of the runs under `checkpoints_dir` that hold a saved model (`config.json`)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p.parent.name for p in checkpoints_dir.glob("*/config.json"))


def resolve_model(
    model: str, checkpoints_dir: Path = CHECKPOINTS_DIR, checkpoint: str | None = None
) -> tuple[str, Path | None]:
    """Where to load `model` from, and the directory its scores go to (None for hub ids and .pth files).

    model: a run name (a folder of `checkpoints_dir`), a run or checkpoint directory, an original `.pth` file, or a
    hub id (OWNER/NAME); a plain name is the run when `checkpoints_dir` has it, else a path. checkpoint: a model
    inside the run or directory (`best`, `iter_005000`), default the run's latest."""
    path, plain = Path(model), RUN_NAME.fullmatch(model) is not None
    if plain and (checkpoints_dir / model).is_dir():
        return model_directory(checkpoints_dir / model, checkpoint)
    if path.is_dir():
        return model_directory(path, checkpoint)
    if path.is_file() or path.suffix in ORIGINAL_SUFFIXES:
        if checkpoint:
            raise LoadError(f"--checkpoint picks a model inside a run or directory; {model} is a file")
        if not path.is_file():
            raise LoadError(f"{model}: no such file (an original .pth decoder, loaded with --backbone)")
        return str(path), None
    if plain:
        raise LoadError(
            f"{model} is neither a run in {checkpoints_dir}/ nor a directory. {runs_listing(checkpoints_dir)}"
        )
    if not HUB_ID.fullmatch(model):
        raise LoadError(f"{model}: no such directory or file. {runs_listing(checkpoints_dir)}")
    if checkpoint:
        raise LoadError(f"--checkpoint picks a model inside a run or directory, not inside the hub id {model}")
    return model, None


def runs_listing(checkpoints_dir: Path) -> str:
    """The runs a user can name, and the other forms --model takes."""
    runs = available_runs(checkpoints_dir)
    listing = ", ".join(runs) if runs else "none yet (train one with train.py --name NAME)"
    return (
        f"Runs in {checkpoints_dir}/: {listing}. --model also takes a run or checkpoint directory, a hub id "
        "(OWNER/NAME) or an original .pth decoder with --backbone."
    )


def model_directory(run_dir: Path, checkpoint: str | None) -> tuple[str, Path]:
    """The model in the run or directory `run_dir`, or its `checkpoint`, checked to hold a saved model
    (config.json)."""
    directory = run_dir / checkpoint if checkpoint else run_dir
    if (directory / "config.json").is_file():
        return str(directory), directory
    kept = sorted(p.parent.name for p in run_dir.glob("*/config.json"))
    models = (["the latest"] if (run_dir / "config.json").is_file() else []) + kept
    if not models:
        raise LoadError(
            f"no trained model in {run_dir} (config.json missing): a run writes its model at its first checkpoint "
            "(train.py --ckpt); a run that stopped before it has none (start it again, or --resume it)"
        )
    raise LoadError(
        f"no trained model in {directory} (config.json missing); models in {run_dir}: {', '.join(models)}"
        " (--checkpoint best exists once a run validates, see train.py --val-interval)"
    )


def load_model(
    source: str,
    backbone: str | None,
    device: str,
    precision: str | None = "fp32",
    backend: str = "torch",
    compiled: Path | None = None,
) -> CLIPSeg | ExportedCLIPSeg:
    """`CLIPSeg.from_pretrained(source)` in eval mode on `device`, prepared for `precision` (clipseg/precision.py), with
    the text cache on; errors become `LoadError` naming the source. backend onnx or openvino: the export folder
    `source` in its runtime (clipseg/backends.py), which computes in its own precision (`precision`, unless None,
    must be it); for OpenVINO, `compiled` is where its graphs compiled for this CPU are kept (None: compiled on
    every load)."""
    if backend != "torch":
        try:
            model = open_export(backend, source, precision, compiled=compiled)
        except ExportUnusable as err:
            raise LoadError(f"cannot load the export {source}: {err}") from err
        model.text_cache = {}
        return model
    try:
        model = CLIPSeg.from_pretrained(source, backbone=backbone)
    except (OSError, ValueError) as err:
        hub = "" if Path(source).exists() else HUB_HINT
        raise LoadError(f"cannot load the model {source}: {err}{hub}") from err
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
