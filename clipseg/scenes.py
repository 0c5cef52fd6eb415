"""Generated scenes: a textured background with shapes of the synthetic data's colours and kinds
(`clipseg.synthetic.COLOURS`, `SHAPES`) and each shape's truth mask. Deterministic for a numpy Generator's seed.

    scene = make_scene(np.random.default_rng(0), 480, 360, 4, (20, 70))   # 4 shapes, radius 20-70 px
    scene.image, scene.phrases, scene.truths                               # PIL RGB, ["red circle", ...], (H, W) bool

Used by the mask measurements (`clipseg.mask_eval`), the README's pictures (`clipseg.mask_gallery`), bench.py's
real-looking inputs and the OpenVINO int8 calibration (`clipseg.onnx.openvino_export`), these two through
`photo_like_images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipseg.synthetic import COLOURS, SHAPES, background

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"  # the shipped scenes: the app's examples


@dataclass
class Scene:
    """A generated image, its phrases and each phrase's (H, W) bool truth."""

    image: Image.Image
    phrases: list[str]
    truths: list[np.ndarray]


def make_scene(rng: np.random.Generator, width: int, height: int, count: int, radius: tuple[float, float]) -> Scene:
    """A textured background with `count` shapes of distinct (colour, kind), radius uniform in `radius` pixels,
    placed apart from each other."""
    canvas = background(rng, width, height)
    pairs = [(colour, kind) for colour in COLOURS for kind in SHAPES]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    placed, phrases, truths = [], [], []
    for index in chosen:
        colour, kind = pairs[index]
        r = float(rng.uniform(*radius))
        for _ in range(100):
            cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
            if all(np.hypot(cx - x, cy - y) > r + q + 8 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        phrases.append(f"{colour} {kind}")
        truths.append(draw_shape(canvas, rng, colour, kind, (cx, cy), r))
    return Scene(canvas, phrases, truths)


def draw_shape(
    canvas: Image.Image, rng: np.random.Generator, colour: str, kind: str, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Draw a shape of the synthetic data (`kind` in SHAPES, `colour` a COLOURS name, each channel jittered by up
    to 12) on `canvas` in place; returns its (H, W) bool truth."""
    polygon = _polygon(kind, *centre, radius)
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[colour])
    ImageDraw.Draw(canvas).polygon(polygon, fill=fill, outline=fill)
    truth = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(truth).polygon(polygon, fill=255, outline=255)
    return np.asarray(truth) > 0


def _polygon(kind: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    corners, start = {"circle": (24, 0.0), "square": (4, np.pi / 4), "triangle": (3, -np.pi / 2)}[kind]
    theta = start + np.arange(corners) * 2 * np.pi / corners
    return [(float(cx + radius * np.cos(t)), float(cy + radius * np.sin(t))) for t in theta]


def photo_like_images(seed: int, count: int) -> list[Image.Image]:
    """`count` 480 x 360 scenes of 4 shapes (radius 20-70 px) from `seed`: real-looking inputs for bench.py's mask
    agreement and the OpenVINO int8 calibration (different seeds keep the two apart)."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, 480, 360, 4, (20, 70)).image for _ in range(count)]
