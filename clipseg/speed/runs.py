"""The rows of a training run and of scoring at the full geometry: a checkpoint written complete or decoder-only,
training samples/s with one prompt per image crop or four, and score.py's scoring with each image encoded once for
all its tasks or once per task.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

import dataset
from clipseg import runs, synthetic
from clipseg.config import DEFAULT_BACKBONE
from clipseg.outputs import json_text
from clipseg.scoring import score
from clipseg.speed.timing import interleaved, sync
from model import CLIPSeg


def run_comparisons(ours: CLIPSeg, device: str, size: int, repeats: int) -> dict:
    """The rows of a training run and of scoring, at the full geometry."""
    return {
        "checkpoint": checkpoint_comparison(ours, repeats),
        "prompts_per_image": prompts_per_image_comparison(ours, device, size, repeats),
        "grouped_scoring": scoring_comparison(ours, size, max(1, repeats // 2)),
    }


def checkpoint_comparison(ours: CLIPSeg, repeats: int) -> dict:
    """A checkpoint at the full ViT-B/16 geometry, interleaved: the complete model (what every checkpoint wrote
    before) against the decoder-only one train.py now writes while it trains, each with the training state
    (decoder + AdamW moments). Seconds and bytes on this machine's disk."""
    model = copy.deepcopy(ours).cpu()
    model.config.clip_source = DEFAULT_BACKBONE  # a reference only: nothing is loaded from it here
    optimizer = torch.optim.AdamW(model.decoder.parameters())
    for parameter in model.decoder.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # AdamW's moments exist, as in a real training state
    state = {"decoder": model.decoder.state_dict(), "optimizer": optimizer.state_dict()}
    with tempfile.TemporaryDirectory(prefix="clipseg-ckpt-") as root:
        files = {name: runs.RunFiles(Path(root) / name) for name in ("complete", "decoder_only")}

        def save(name: str) -> None:
            files[name].dir.mkdir(exist_ok=True)
            runs.save_model(model, files[name].dir, complete=name == "complete")
            runs.save_state(files[name], state)

        timing = interleaved({name: lambda name=name: save(name) for name in files}, repeats)
        sizes = {name: sum(p.stat().st_size for p in f.dir.iterdir()) for name, f in files.items()}
    out = {name: {"seconds": timing[name], "bytes": sizes[name]} for name in files}
    out["speedup"] = timing["complete"] / timing["decoder_only"]
    print(
        f"checkpoint at ViT-B/16 (model + training state): complete {timing['complete']:.2f} s, "
        f"{sizes['complete'] / 1e6:.0f} MB; decoder-only {timing['decoder_only'] * 1e3:.0f} ms, "
        f"{sizes['decoder_only'] / 1e6:.1f} MB ({out['speedup']:.0f}x faster)"
    )
    return out


def prompts_per_image_comparison(ours: CLIPSeg, device: str, size: int, repeats: int, batch: int = 8) -> dict:
    """Training samples/s (forward with labels, backward, AdamW step; fp32; the data pipeline left out) with one
    prompt per image crop, the recipe, against train.py --prompts-per-image 4: the same 8 samples on a quarter of
    the crops, so the frozen vision tower runs a quarter as often."""
    model = copy.deepcopy(ours).train()
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=1e-4)
    conditional = torch.randn(batch, model.config.clip.projection_dim, device=device)
    labels = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    crops = {k: torch.randn(batch // k, 3, size, size, device=device) for k in (1, 4)}

    def step(k: int) -> None:
        loss = model(crops[k], conditional=conditional, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)

    timing = interleaved({f"k{k}": lambda k=k: step(k) for k in crops}, repeats)
    rates = {name: batch / seconds for name, seconds in timing.items()}
    out = {"batch": batch, "samples_per_s": rates, "speedup": rates["k4"] / rates["k1"]}
    print(
        f"training step, {batch} samples: 1 prompt per crop {rates['k1']:.2f} samples/s, 4 prompts per crop "
        f"{rates['k4']:.2f} samples/s ({out['speedup']:.2f}x)"
    )
    return out


def scoring_comparison(ours: CLIPSeg, size: int, repeats: int, images: int = 10) -> dict:
    """score.py on a generated PhraseCut-format split whose images have 5 or more tasks each (PhraseCut's test
    split has 5.6), fp32: each image read and encoded once for all its tasks, as score.py does, against once per
    task, as the reference implementations do. Same metrics either way (tests/test_inference.py)."""
    model = copy.deepcopy(ours).eval()
    model.text_cache = {}
    with tempfile.TemporaryDirectory(prefix="clipseg-score-") as root:
        data_dir = synthetic.make_synthetic_phrasecut(root, n_images=12 * images, seed=1, fixed_size=(500, 375))
        tasks = [t for split in dataset.SPLITS for t in json.loads((data_dir / f"refer_{split}.json").read_text())]
        per_image = Counter(t["image_id"] for t in tasks)
        chosen = sorted(i for i, n in per_image.items() if n >= 5)[:images]
        kept = [t for t in tasks if t["image_id"] in chosen]
        (data_dir / "refer_test.json").write_text(json_text(kept))
        data = dataset.PhraseCut(root, "test", train=False, image_size=size, cache_dir=Path(root) / "index")
        variants = {
            "grouped": lambda: score(model, data, batch_size=16),
            "per_task": lambda: score(model, data, batch_size=16, group_by_image=False),
        }
        timing = interleaved(variants, repeats, warmup=0)
    out = {
        "images": len(chosen),
        "tasks": len(kept),
        "tasks_per_image": len(kept) / len(chosen),
        "seconds": timing,
        "speedup": timing["per_task"] / timing["grouped"],
    }
    print(
        f"scoring {len(kept)} tasks on {len(chosen)} images ({out['tasks_per_image']:.1f} per image): each image "
        f"once {timing['grouped']:.1f} s, once per task {timing['per_task']:.1f} s ({out['speedup']:.2f}x)"
    )
    return out
