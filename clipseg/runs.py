"""The files of a training run, `checkpoints/<name>/`, each written atomically: a kill at any moment leaves the last
checkpoint intact.

    args.json            the run's arguments (--resume reads them)
    config.json +        the model while the run goes on: the decoder only (a few MB; `config.json` names where the
    decoder.safetensors  frozen CLIP comes from), loadable with CLIPSeg.from_pretrained("checkpoints/<name>")
    config.json +        the complete model once the run ends (and throughout for random backbones, whose CLIP
    model.safetensors    cannot be loaded again): also loadable by transformers.CLIPSegForImageSegmentation
    train_state.pt       step, optimiser, scheduler, scaler, best validation so far and the decoder (resume trusts it)
    best/                the complete model of the best validation so far (--val-interval); best/best.json says which
                         (and holds the validation curve); config.json's `clipseg_threshold` in best/ and in the
                         run is the calibrated mask threshold of the last validation of those weights
    iter_005000/         complete models kept at the --keep-checkpoints iterations
    log.jsonl, loss.png  training loss, learning rate, samples/s and validation metrics, and their plot
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from clipseg.outputs import atomic_write, check_writable, json_text, write_json, write_text
from model import CLIPSeg

STATE_FORMAT = 1
BEST_NAME = "best"
BEST_INFO = "best.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class RunFiles:
    """The paths of `checkpoints/<name>/`."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.args, self.state = self.dir / "args.json", self.dir / "train_state.pt"
        self.log, self.plot = self.dir / "log.jsonl", self.dir / "loss.png"
        self.best = self.dir / BEST_NAME

    def kept(self, step: int) -> Path:
        return self.dir / f"iter_{step:06d}"


def check_run_writable(directory: Path, needed_bytes: int) -> None:
    """Fail before training if the run directory cannot be created or written, or the disk is too full. Raises
    CheckpointWriteError with the reason."""
    what = "checkpoints (the complete model twice during an atomic write, plus the training state)"
    try:
        check_writable(directory, folder=True, needed_bytes=needed_bytes, what=what)
    except OSError as err:
        raise CheckpointWriteError(f"{err}; choose another --checkpoints-dir or free space") from err


def checkpoint_bytes(model: CLIPSeg) -> int:
    """Room for writing the complete model while a previous copy still exists, plus the decoder with its two
    AdamW moments."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    decoder_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    return 2 * (model_bytes + 3 * decoder_bytes) + 2**20


def save_model(model: CLIPSeg, directory: Path, complete: bool) -> None:
    """The model in `directory`: complete, or the decoder only where the CLIP can be loaded again by reference."""
    model.save_pretrained(directory, decoder_only=not complete and model.config.clip_source is not None)


def save_state(files: RunFiles, state: dict) -> None:
    """train_state.pt, serialised in memory first (a few times the decoder's size): a full disk is then an OSError
    from the file write, where torch.save into the file would raise a RuntimeError."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(files.state, lambda path: Path(path).write_bytes(buffer.getbuffer()))


STATE_PARTS = ("decoder", "optimizer", "scheduler", "scaler")  # what a training state restores, besides the step


def load_state(files: RunFiles) -> dict:
    """train_state.pt, read with `weights_only=True` (tensors and containers only). Raises ValueError."""
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{files.state} is damaged or not a training state ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{files.state}: unknown training-state format; was it written by this train.py?")
    missing = [key for key in STATE_PARTS if not isinstance(state.get(key), dict)]
    step = state.get("step")
    if missing or type(step) is not int or step < 0:
        wrong = f"its {', '.join(missing)} missing" if missing else f"its step {step!r} is not an iteration"
        raise ValueError(f"{files.state} is damaged ({wrong}); resume from a copy of the run or start it again")
    return state


def save_complete(model: CLIPSeg, directory: Path, info: dict | None = None, info_name: str = BEST_INFO) -> None:
    """A complete, loadable model in `directory` (best/, iter_N/), with an optional JSON note of what it is. The
    config is constant within a run, so the atomic replacement of the weights file is the commit point."""
    model.save_pretrained(directory)
    if info is not None:
        write_json(directory / info_name, info)


def write_args(files: RunFiles, record: dict) -> None:
    write_text(files.args, json_text(record, indent=2, sort_keys=True))


def read_log(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Log records, skipping a line cut short by a kill (or anything else that is not a JSON object) and (when
    resuming) records after the checkpoint."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(step := record.get("step", 0), (int, float)):
            continue
        if up_to_step is None or step <= up_to_step:
            records.append(record)
    return records


def rewrite_log(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json_text(r) + "\n" for r in records))


def _numbers(record: dict, *keys: str) -> bool:
    """Whether `record` holds a number (not a bool) under each of `keys`."""
    return all(isinstance(record.get(key), int | float) and not isinstance(record.get(key), bool) for key in keys)


def plot_log(files: RunFiles, name: str) -> None:
    """loss.png: the training loss per log interval with its running mean and the learning rate; below it, when
    the run validates, the validation metrics and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(files.log)
    train = [r for r in records if _numbers(r, "loss", "lr")]  # a line edited by hand into something else: left out
    validation = [r for r in records if _numbers(r, "val_loss", "val_miou", "val_iou_fg", "val_ap")]
    if not train:
        return
    rows = 2 if validation else 1
    figure, axes = plt.subplots(rows, 1, figsize=(7, 4 * rows), dpi=100, squeeze=False)
    axis = axes[0, 0]
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss (per log interval)")
    axis.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"running mean ({window} points)")
    axis.set(xlabel="iteration", ylabel="BCE loss", yscale="log", title=f"{name}: training loss")
    lr_axis = axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in train], color="tab:orange", lw=1, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    axis.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    if validation:
        axis = axes[1, 0]
        steps = [r["step"] for r in validation]
        for key, colour in (("val_miou", "tab:green"), ("val_iou_fg", "tab:purple"), ("val_ap", "tab:red")):
            axis.plot(steps, [r[key] for r in validation], marker="o", ms=3, color=colour, label=key[4:])
        best = [r for r in validation if r.get("best")]
        if best:
            axis.axvline(best[-1]["step"], color="grey", ls="--", lw=1, label=f"best ({best[-1]['step']})")
        axis.set(xlabel="iteration", ylabel="paper metric at t = 0.3", title="validation")
        loss_axis = axis.twinx()
        loss_axis.plot(steps, [r["val_loss"] for r in validation], color="tab:blue", lw=1, ls=":", label="loss")
        loss_axis.set_ylabel("validation BCE loss")
        handles = axis.get_legend_handles_labels()[0] + loss_axis.get_legend_handles_labels()[0]
        axis.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    figure.tight_layout()
    atomic_write(files.plot, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)
