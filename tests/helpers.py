"""Helpers several test modules share: independent references the project is compared against (the authors'
image pipeline, crop search and ground truth; HF's CLIPSeg class; the paper's metrics computed by brute force), the
generated PhraseCut's files, a parser for the failure gallery's HTML, train.py's tiny runs and their files read back
(for test_train.py and test_train_resume.py), and app.py's page served on a free port for its server and browser
tests. Fixtures live in conftest.py."""

import json
import os
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import free_port, require
from safetensors.torch import load_file
from scipy.integrate import simpson
from skimage.draw import polygon2mask
from torch.utils.data import Dataset

import dataset as datasets
import train
from clipseg import runs
from clipseg.config import CLIPSegConfig
from clipseg.samples import Sample
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import CLIPSeg

if TYPE_CHECKING:
    from clipseg.segmenter import Segmenter


def data_dir(root: Path) -> Path:
    return root / "data" / "VGPhraseCut_v0"


def refer(root: Path, split: str) -> list[dict]:
    return json.loads((data_dir(root) / f"refer_{split}.json").read_text())


def original_pipeline(array: np.ndarray, size: int) -> torch.Tensor:
    """The authors' image steps (docs/original.md §5.7): float image, interpolate bilinear align_corners=True,
    / 255, then torchvision's Normalize (subtract, divide)."""
    image = torch.from_numpy(np.array(array)).permute(2, 0, 1).unsqueeze(0).float()
    image = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)[0] / 255.0
    return (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def find_crop_reference(mask: np.ndarray, offsets, min_fraction=0.05):
    """The authors' find_crop(iterations=50, min_frac=0.05) as docs/original.md §5.6 states it, on given offsets."""
    height, width = mask.shape
    side = min(height, width)
    threshold = height * width * min_fraction
    best = (float("-inf"), None)
    for top, left in offsets:
        count = mask[top : top + side, left : left + side].sum()
        if count > threshold:
            return top, left, side
        if count > best[0]:
            best = (count, (top, left))
    return (*best[1], side)


def skimage_union(polygons, height: int, width: int) -> np.ndarray:
    """The original CLIPSeg's ground truth: skimage polygon2mask per polygon, [x, y] swapped, logical max."""
    masks = [polygon2mask((height, width), np.asarray(p, dtype=float)[:, ::-1]) for p in polygons]
    return np.stack(masks).max(0) if masks else np.zeros((height, width), bool)


def hf_reference(config: CLIPSegConfig) -> transformers.CLIPSegForImageSegmentation:
    torch.manual_seed(0)
    hf = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig.from_dict(config.to_hf_dict()))
    # HF initialises some decoder biases to zero; random values make the parity check stronger.
    with torch.no_grad():
        for param in hf.decoder.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return hf.eval()


def hf_logits(hf, pixels, input_ids=None, attention_mask=None, prompt_images=None) -> torch.Tensor:
    with torch.no_grad():
        out = hf(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            conditional_pixel_values=prompt_images,
        )
    return out.logits.reshape(len(pixels), 1, *pixels.shape[-2:])


PARITY_PHRASES = ["a red circle", "the large blue square on the left"]


def assert_parity(hf, ours, size: int, tol: float) -> None:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, size, size)
    ids, mask = ours.tokenize(PARITY_PHRASES)
    with torch.no_grad():
        text = ours(pixels, PARITY_PHRASES).logits
    assert text.shape == (2, 1, size, size)
    assert (text - hf_logits(hf, pixels, ids, mask)).abs().max() <= tol
    prompts = torch.randn(2, 3, size, size)
    with torch.no_grad():
        image = ours(pixels, prompt_images=prompts).logits
    assert (image - hf_logits(hf, pixels, prompt_images=prompts)).abs().max() <= tol


PAPER_THRESHOLDS = np.linspace(0.02, 0.98, 49)


def brute_force_paper(probs: np.ndarray, targets: np.ndarray) -> dict:
    """The paper's metrics from scratch: probs, targets (N, H, W). Returns values per threshold and AP."""
    positive = probs[:, None] > PAPER_THRESHOLDS[None, :, None, None]  # (N, T, H, W)
    truth = targets[:, None].astype(bool)
    tp = (positive & truth).sum(axis=(2, 3)).astype(float)
    fp = (positive & ~truth).sum(axis=(2, 3)).astype(float)
    fn = (~positive & truth).sum(axis=(2, 3)).astype(float)
    tn = (~positive & ~truth).sum(axis=(2, 3)).astype(float)
    miou = (tp / (1 + tp + fp + fn)).mean(axis=0)
    sums = [c.sum(axis=0) for c in (tp, fp, fn, tn)]
    iou_fg = sums[0] / (1 + sums[0] + sums[1] + sums[2])
    iou_bg = sums[3] / (1 + sums[3] + sums[1] + sums[2])
    precision, recall = sums[0] / (1 + sums[0] + sums[1]), sums[0] / (1 + sums[0] + sums[2])
    valid = (sums[0] + sums[1]) > 0
    pairs = sorted(set(zip(recall[valid].tolist(), precision[valid].tolist())))
    ap = float(simpson([p for _, p in pairs], x=[r for r, _ in pairs])) if len(pairs) > 1 else 0.0
    return {"miou": miou, "iou_fg": iou_fg, "iou_bin": (iou_fg + iou_bg) / 2, "ap": ap}


def recompute(checkpoints, synthetic_root, phrases_for=None, size: int = 64, limit: int = 6):
    """Load the run `demo` and run it on the same samples and batches as score.py (test split, the first `limit`
    tasks at `size`); the metrics by hand."""
    model = CLIPSeg.from_pretrained(checkpoints / "demo").eval()
    data = datasets.build_dataset("synthetic", synthetic_root, "test", train=False, image_size=size, limit=limit)
    samples = [data[i] for i in range(len(data))]
    probs, ious, inter, union, masks = [], [], 0, 0, {}
    for start in range(0, len(samples), 4):
        batch = datasets.collate(samples[start : start + 4])
        phrases = [phrases_for[t] for t in batch.task_ids] if phrases_for else batch.phrases
        with torch.no_grad():
            logits = model(batch.pixel_values, phrases).logits
        probs.append(torch.sigmoid(logits[:, 0]).numpy())
        for i, task_id in enumerate(batch.task_ids):
            height, width = batch.images[batch.image_of_task[i]].original_size
            full = F.interpolate(logits[i : i + 1], size=(height, width), mode="bilinear")
            pred = torch.sigmoid(full[0, 0]).numpy() > 0.3
            gt = np.asarray(batch.tasks[i].full_mask, dtype=bool)
            i_count, u_count = (pred & gt).sum(), (pred | gt).sum()
            ious.append(i_count / u_count if u_count else 0.0)
            inter, union = inter + i_count, union + u_count
            masks[task_id] = pred
    targets = np.concatenate([s.masks[:, 0].numpy() for s in samples])
    paper = brute_force_paper(np.concatenate(probs), targets)
    return paper, np.array(ious), inter / union, masks, samples


GOOD_TRIANGLE = [[1.0, 1.0], [20.0, 1.0], [20.0, 20.0]]
NAN, INF = float("nan"), float("inf")


def write_bad_polygons(root: Path, split: str) -> list[str]:
    """Break the polygons of the first three tasks of `split` (written with NaN/Infinity, as Python's json allows):
    task 0 keeps a good triangle beside a NaN polygon; task 1 has only an infinite and a collinear polygon; task 2
    only a polygon whose vertices coincide. Returns the three task ids."""
    tasks = refer(root, split)
    tasks[0]["Polygons"] = [[GOOD_TRIANGLE, [[NAN, 2.0], [3.0, 4.0], [5.0, 9.0]]]]
    tasks[1]["Polygons"] = [[[[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]], [[[INF, 1.0], [2.0, 2.0], [3.0, 1.0]]]]
    tasks[2]["Polygons"] = [[[[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]]]
    (data_dir(root) / f"refer_{split}.json").write_text(json.dumps(tasks))
    return [task["task_id"] for task in tasks[:3]]


class GalleryParser(HTMLParser):
    """Collects <img src> and the text of each table row of index.html."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.open_tags = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows.append([])
        if tag not in ("img", "meta"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> does not close <{self.open_tags[-1:]}>"
        self.open_tags.pop()

    def handle_data(self, data):
        if self.rows and data.strip():
            self.rows[-1].append(data.strip())


def parse_gallery(path: Path) -> GalleryParser:
    parser = GalleryParser()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser.feed(text)
    parser.close()
    assert parser.open_tags == []
    return parser


def assert_close(got, expected, rel: float, same_types: bool = True) -> None:
    """Nested dicts equal, floats to `rel`, everything else exactly (and of the same type with `same_types`)."""
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_close(got[key], expected[key], rel, same_types)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rel, abs=0)
    else:
        assert got == expected and (not same_types or type(got) is type(expected))


# ------------------------------------------------------------ train.py's tiny runs, for its two test modules

TINY = ["--backbone=tiny", "--device=cpu", "--image-size=64", "--batch-size=4", "--num-workers=0", "--log-every=1"]
VALIDATE = ["--val-interval=4", "--val-samples=7", "--val-split=val"]


def flags(tmp_path: Path, synthetic_root: Path, *extra: str) -> list[str]:
    data = ["--data=synthetic", f"--data-root={synthetic_root}"]
    return [*TINY, *data, f"--checkpoints-dir={tmp_path / 'ck'}", *extra]


def run(argv: list[str], dataset: Dataset | None = None) -> train.Summary:
    return train.train(train.parse_args(argv), dataset=dataset)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in runs.read_log(run_dir / "log.jsonl") if "loss" in r]


def validation_records(run_dir: Path) -> list[dict]:
    return [r for r in runs.read_log(run_dir / "log.jsonl") if "val_loss" in r]


def decoder_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run_dir / "model.safetensors").items() if k.startswith("decoder.")}


def training_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "train_state.pt", weights_only=True)


def subprocess_env(threads: int = 1) -> dict:
    """CPU kernels may sum in another order with another thread count: a run continued in-process must use ours."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class SyntheticView(Dataset):
    """The synthetic training set, with a hook called before each sample is read (the n-th call, from 1)."""

    def __init__(self, root: Path, on_read=None, **kwargs):
        self.inner = datasets.build_dataset(
            "synthetic", root, "train", train=True, image_size=64, negative_prob=0.2, **kwargs
        )
        self.on_read, self.reads = on_read, 0

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Sample:
        self.reads += 1
        sample = self.inner[index]
        return self.on_read(self.reads, sample) if self.on_read else sample


# ------------------------------------------------------------------------------------ the app, for its tests


def gradio_or_skip() -> None:
    """Skip a test when Gradio (requirements-app.txt) is missing (fail under CI=true, as `require`)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        require("gradio", "pip install -r requirements-app.txt")


@contextmanager
def serving(segmenter: "Segmenter"):
    """The app on a free local port: yields its URL."""
    import app

    page = app.build_page(segmenter)
    url, _ = app.launch(page, free_port())
    try:
        yield url
    finally:
        page.close()
