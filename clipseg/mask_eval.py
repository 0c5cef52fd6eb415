"""Measurements of the mask pipeline on generated scenes, each figure reproduced by one command:

    python -m clipseg.mask_eval --model checkpoints/demo [--only tiles,guided,threshold] [--json out.json]

(a) tiles: images of 1,024-2,048 px with small objects (shapes of the synthetic data's colours and kinds, radius a
    few percent of the image), one pass (the image shrunk to the model's input side) against tiles at the model's
    input side (`clipseg.tiling`); mIoU over the small objects at the source resolution.
(b) guided: scenes at the synthetic data's scale (shapes 9-22 % of the short side, 400-640 px), bilinear
    upsampling of the model's map against `refine="guided"` (`clipseg.refine.guided_refine`); boundary F-score
    (2-px tolerance, `boundary_f_score`) and mIoU at the source resolution.
(c) threshold: the calibrated threshold (train.py's rule, `clipseg.training.calibration`: the argmax of the mIoU
    curve over 0.02 ... 0.98 on a calibration split) against 0.5 and the paper's 0.3, scored on a held-out split of
    other scenes (other seeds).

Each phrase names one object ("<colour> <shape>", a distinct pair per scene), so its truth is that object's mask.
mIoU: the mean over (scene, phrase) of the IoU of the mask (probability > threshold) and the truth. Deterministic for
a seed; CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from clipseg.metrics import PaperMetrics, binary_iou
from clipseg.postprocess import PAPER_THRESHOLD
from clipseg.predictor import Predictor
from clipseg.scenes import make_scene
from clipseg.training import calibration
from model import CLIPSeg


def boundary_f_score(prediction: np.ndarray, truth: np.ndarray, tolerance: float = 2.0) -> float:
    """F-score of the boundaries of two (H, W) bool masks: a boundary pixel (a mask pixel with a 4-neighbour
    outside it; the image border is no boundary) matches when one of the other mask's lies within `tolerance`
    pixels. 1 when neither mask has a boundary, 0 when only one has."""

    def edge(mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        return mask & ~ndimage.binary_erosion(mask, border_value=1)

    predicted, true = edge(prediction), edge(truth)
    if not predicted.any() or not true.any():
        return float(predicted.any() == true.any())
    precision = (ndimage.distance_transform_edt(~true)[predicted] <= tolerance).mean()
    recall = (ndimage.distance_transform_edt(~predicted)[true] <= tolerance).mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def measure_tiles(predictor: Predictor, n_images: int, seed: int) -> dict:
    """(a): mIoU of the small objects, one pass vs tiles at the model's input side (a quarter overlapping)."""
    rng = np.random.default_rng(seed)
    side = predictor.transform.size
    ious: dict[str, list[float]] = {"one_pass": [], "tiles": []}
    seconds = {"one_pass": 0.0, "tiles": 0.0}
    for _ in range(n_images):
        width, height = (int(v) for v in rng.integers(1024, 2049, size=2))
        scene = make_scene(rng, width, height, 8, (0.09 * side, 0.22 * side))
        predictor.set_image(scene.image, encode=False)
        for name, tile in (("one_pass", None), ("tiles", side)):
            started = time.perf_counter()
            found = predictor.predict_masks(scene.phrases, PAPER_THRESHOLD, tile=tile)
            seconds[name] += time.perf_counter() - started
            ious[name] += [binary_iou(mask, truth, both_empty=1.0) for mask, truth in zip(found.masks, scene.truths)]
    result = {name: round(float(np.mean(values)), 4) for name, values in ious.items()}
    return {"miou": result, "objects": len(ious["tiles"]), "images": n_images, "tile": side,
            "seconds_per_image": {k: round(v / n_images, 2) for k, v in seconds.items()}}  # fmt: skip


def measure_guided(predictor: Predictor, n_images: int, seed: int) -> dict:
    """(b): boundary F-score (2 px) and mIoU, bilinear vs guided, at the source resolution."""
    rng = np.random.default_rng(seed)
    scores: dict[str, dict[str, list[float]]] = {"bilinear": {"bf": [], "iou": []}, "guided": {"bf": [], "iou": []}}
    for _ in range(n_images):
        width, height = (int(v) for v in rng.integers(400, 641, size=2))
        short = min(width, height)
        scene = make_scene(rng, width, height, 4, (0.09 * short, 0.22 * short))
        predictor.set_image(scene.image)
        for name, refine in (("bilinear", "none"), ("guided", "guided")):
            found = predictor.predict_masks(scene.phrases, PAPER_THRESHOLD, refine=refine)
            for mask, truth in zip(found.masks, scene.truths):
                scores[name]["bf"].append(boundary_f_score(mask, truth, 2.0))
                scores[name]["iou"].append(binary_iou(mask, truth, both_empty=1.0))
    return {
        name: {"boundary_f": round(float(np.mean(v["bf"])), 4), "miou": round(float(np.mean(v["iou"])), 4)}
        for name, v in scores.items()
    } | {"objects": len(scores["guided"]["iou"]), "images": n_images}


def measure_threshold(predictor: Predictor, n_images: int, seed: int) -> dict:
    """(c): the threshold calibrated on one split (train.py's rule) against 0.5 and 0.3 on a held-out split."""

    def split_metrics(split_seed: int) -> PaperMetrics:
        rng, paper = np.random.default_rng(split_seed), PaperMetrics()
        for _ in range(n_images):
            width, height = (int(v) for v in rng.integers(240, 501, size=2))
            short = min(width, height)
            scene = make_scene(rng, width, height, 4, (0.09 * short, 0.22 * short))
            predictor.set_image(scene.image)
            probs = predictor.predict(phrases=scene.phrases)
            for prob, truth in zip(probs, scene.truths):
                paper.update(prob[None], truth[None])
        return paper

    calibrated, curve = calibration(split_metrics(seed), "miou")
    held_out = split_metrics(seed + 1000).curves()
    thresholds = list(np.round(held_out["thresholds"], 4))

    def at(threshold: float) -> float:
        return round(float(held_out["miou"][thresholds.index(round(threshold, 4))]), 4)

    return {
        "calibrated_threshold": calibrated,
        "held_out_miou": {"calibrated": at(calibrated or PAPER_THRESHOLD), "0.5": at(0.5), "0.3 (paper)": at(0.3)},
        "held_out_best": {
            "threshold": thresholds[int(np.argmax(held_out["miou"]))],
            "miou": round(float(np.max(held_out["miou"])), 4),
        },  # fmt: skip
        "images_per_split": n_images,
        "calibration_curve_max": round(max(curve["values"]), 4),
    }


MEASUREMENTS = {"tiles": measure_tiles, "guided": measure_guided, "threshold": measure_threshold}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory or hub id (CLIPSeg.from_pretrained)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated: tiles, guided, threshold")
    parser.add_argument("--images", type=int, default=None, help="scenes per measurement (default 6, 24, 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    torch.manual_seed(args.seed)
    model = CLIPSeg.from_pretrained(args.model).eval()
    predictor = Predictor(model)
    defaults = {"tiles": 6, "guided": 24, "threshold": 40}
    results = {"model": args.model, "image_size": predictor.transform.size, "seed": args.seed}
    for name in chosen:
        started = time.perf_counter()
        results[name] = MEASUREMENTS[name](predictor, args.images or defaults[name], args.seed)
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: results[name]}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
