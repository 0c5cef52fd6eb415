"""Pictures of the mask pipeline's steps for README, one small labelled before/after PNG per step, reproduced by one
command:

    python -m clipseg.mask_gallery --model checkpoints/demo --out docs/masks

Every mask comes from the library's pipeline (`clipseg.predictor.Predictor.predict_masks`: `clipseg.mask_pipeline`
with `clipseg.expressions`, `clipseg.postprocess`, `clipseg.refine` and `clipseg.tiling`) with the options of
predict.py's flags, the cut-out from `clipseg.mask_formats.cutout`; this module lays them out only, with
`clipseg.drawing`'s overlays and heatmaps. The scenes are generated with the synthetic data's colours and shapes
(`clipseg.synthetic.background`, `clipseg.scenes.draw_shape`, `make_scene`) at fixed places, so a seed gives the
same pictures.
Sizes follow the model's input side S (128 for the demo model): the scenes are 3.75 S x 2.8 S, and the large scene of
the tiles 8 S x 6 S with shapes of radius 0.09 S to 0.22 S (`clipseg.mask_eval`'s tiles measurement).

The steps (`STEPS`, also the file names): threshold (the probability map and the mask above the threshold),
expressions (`a | b`, `a - b`, `a & b`), grow_shrink, feather, fill_holes, min_area, instances (coloured, sorted,
the best K kept), guided (guided refinement against bilinear upsampling, on a crop of an edge), tiles (tiles against
one pass on the large scene) and cutout (the RGBA cut-out). The threshold is the model's default (calibrated, else
the paper's 0.3; `Predictor.default_threshold`), named in each picture's title, but for min_area's low one.
`main` returns each step's `Picture`: its file, size, and the masks it shows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from clipseg.drawing import draw_overlay, heatmap, mask_contour, mask_image, probability_png, text_font
from clipseg.mask_formats import cutout
from clipseg.mask_pipeline import MaskPrediction
from clipseg.postprocess import CONNECTIVITY, MaskOptions
from clipseg.predictor import Predictor
from clipseg.scenes import Scene, draw_shape, make_scene
from clipseg.synthetic import background
from model import CLIPSeg

STEPS = (
    "threshold", "expressions", "grow_shrink", "feather", "fill_holes", "min_area", "instances", "guided", "tiles",
    "cutout",
)  # fmt: skip
CELL = 192  # the long side of a panel's cell, in pixels: three cells and their gaps make a panel about 600 px wide
GAP = 6
LABEL_SIZE, TITLE_SIZE = 13, 14  # font sizes in pixels
FIRST_COLOUR = 6  # masks are drawn in clipseg.drawing.PALETTE from cyan, a colour no generated shape has
PALETTE_COLOURS = 256  # the PNGs are saved with a palette of this many colours (no dithering): small files
GROW = SHRINK = 10  # pixels, at the main scene's size
FEATHER = 16
MIN_AREA_SHARE = 0.003  # --min-area as a share of the scene's pixels (516 px on the demo's 480 x 358 scene)
MIN_AREA_THRESHOLD = 0.1  # a low threshold, which leaves specks for --min-area to drop
MIN_AREA_PHRASE = "circle"
MAX_INSTANCES = 2
EDGE_CROP = 0.35  # the guided picture's crop: this share of the circle's diameter, on its edge
CUTOUT_FEATHER = 6
# The main scene's shapes: (colour, kind, centre x and y as shares of the width and height, radius as a share of the
# short side). Shapes of the synthetic data; "large" and "small" as its grammar sizes them (SIZE_WORDS).
MAIN_SHAPES = (
    ("red", "circle", 0.28, 0.58, 0.21),
    ("red", "circle", 0.60, 0.24, 0.10),
    ("blue", "circle", 0.77, 0.66, 0.19),
    ("green", "triangle", 0.88, 0.17, 0.11),
)
# The fill-holes scene: a yellow square with a purple circle on it (a hole in the square's mask).
HOLE_SHAPES = (("yellow", "square", 0.5, 0.5, 0.3), ("purple", "circle", 0.5, 0.5, 0.1))
A, B = "red circle", "large circle"  # the two phrases of the expressions picture


@dataclass
class Picture:
    """One step's picture: its file, its pixel size (W, H), the pipeline's masks it shows (each (H, W) bool at the
    scene's size, by a short key such as "threshold" or "grow") and the options it set beyond the defaults."""

    name: str
    path: Path
    size: tuple[int, int]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    options: dict[str, float] = field(default_factory=dict)


@dataclass
class Cell:
    """A panel's cell: a picture at most CELL pixels on its long side, and its label."""

    image: Image.Image
    label: str


# ------------------------------------------------------------------------------------------------- scenes


def placed_scene(
    rng: np.random.Generator, width: int, height: int, shapes: Sequence[tuple[str, str, float, float, float]]
) -> Scene:
    """A `background` with `shapes` (colour, kind, x and y as shares of the size, radius as a share of the
    short side) drawn in order; its phrases "<colour> <kind>" and truths in the same order."""
    canvas, short = background(rng, width, height), min(width, height)
    truths = [draw_shape(canvas, rng, c, k, (x * width, y * height), r * short) for c, k, x, y, r in shapes]
    return Scene(canvas, [f"{c} {k}" for c, k, *_ in shapes], truths)


def main_scene(side: int, seed: int) -> Scene:
    """The scene of most pictures: MAIN_SHAPES on a 3.75 S x 2.8 S background (480 x 358 for S = 128)."""
    return placed_scene(np.random.default_rng(seed), round(3.75 * side), round(2.8 * side), MAIN_SHAPES)


# ------------------------------------------------------------------------------------------------- drawing


def fit(image: Image.Image, side: int = CELL, resample: int = Image.BILINEAR) -> Image.Image:
    """`image` resized so that its long side is `side` (up or down), keeping its aspect."""
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def shown_masks(masks: Sequence[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """(H, W) bool masks resized (nearest) to `size` = (W, H)."""
    return [np.asarray(mask_image(mask).resize(size, Image.NEAREST)) > 127 for mask in masks]


def overlay_cell(
    image: Image.Image, masks: Sequence[np.ndarray], label: str, legend: Sequence[str] = (), side: int = CELL
) -> Cell:
    """A cell of `image` fitted to `side` with the (H, W) masks blended in PALETTE order from FIRST_COLOUR
    (`draw_overlay`)."""
    shown = fit(image, side)
    return Cell(draw_overlay(shown, shown_masks(masks, shown.size), list(legend), FIRST_COLOUR), label)


def outlined(cell: Cell, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)) -> Cell:
    """The cell with the 1-px contour of `mask` (at the scene's size) drawn over it: a reference outline."""
    pixels = np.asarray(cell.image).copy()
    pixels[mask_contour(shown_masks([mask], cell.image.size)[0], 1)] = colour
    return Cell(Image.fromarray(pixels), cell.label)


def ringed(cell: Cell, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)) -> Cell:
    """The cell with a ring around each connected component of `mask` (at the scene's size): specks made visible."""
    image = cell.image.copy()
    scale = image.width / mask.shape[1]
    labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
    for rows, cols in ndimage.find_objects(labels):
        x, y = (cols.start + cols.stop) / 2 * scale, (rows.start + rows.stop) / 2 * scale
        radius = max(cols.stop - cols.start, rows.stop - rows.start) * scale / 2 + 5
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)
    return Cell(image, cell.label)


def crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): a square around the (H, W) bool mask's bounding box, `margin` of its side added
    on each side, moved inside the image (and at most as large)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    side = int(min(round(extent * (1 + 2 * margin)), *mask.shape))
    centre_x, centre_y = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
    left = int(np.clip(round(centre_x - side / 2), 0, mask.shape[1] - side))
    top = int(np.clip(round(centre_y - side / 2), 0, mask.shape[0] - side))
    return left, top, left + side, top + side


def crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return array[top:bottom, left:right]


def panel(title: str, cells: Sequence[Cell], columns: int) -> Image.Image:
    """The cells in a grid of `columns` (each under its label; a row as high as its highest cell) below a title
    line, on white."""
    width = max(cell.image.width for cell in cells)
    rows = [cells[start : start + columns] for start in range(0, len(cells), columns)]
    label_height, title_height = LABEL_SIZE + 6, TITLE_SIZE + 10
    heights = [label_height + max(cell.image.height for cell in row) + GAP for row in rows]
    canvas = Image.new("RGB", (columns * width + (columns + 1) * GAP, title_height + sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 5), title, fill=(0, 0, 0), font=text_font(TITLE_SIZE))
    top = title_height
    for row, height in zip(rows, heights):
        for column, cell in enumerate(row):
            left = GAP + column * (width + GAP)
            draw.text((left, top + 1), cell.label, fill=(40, 40, 40), font=text_font(LABEL_SIZE))
            canvas.paste(cell.image, (left, top + label_height))
        top += height
    return canvas


def save(picture: Image.Image, path: Path) -> tuple[int, int]:
    """Save as a PNG with PALETTE_COLOURS colours (median cut, no dithering); returns its size (W, H)."""
    picture.quantize(PALETTE_COLOURS, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return picture.size


def checkerboard(size: tuple[int, int], square: int = 8) -> Image.Image:
    """A light grey checkerboard of `size` (W, H): the usual backdrop of transparency."""
    ys, xs = np.mgrid[: size[1], : size[0]]
    light = ((xs // square + ys // square) % 2).astype(bool)
    return Image.fromarray(np.where(light[..., None], 235, 200).astype(np.uint8).repeat(3, axis=-1))


def components(mask: np.ndarray) -> int:
    """The number of the (H, W) bool mask's connected components (8-connected, as the post-processing counts)."""
    return int(ndimage.label(mask, structure=CONNECTIVITY)[1])


def threshold_text(found: MaskPrediction) -> str:
    return f"threshold {found.threshold:g} ({found.threshold_source})"


# ------------------------------------------------------------------------------------------------- the steps
# Each step: (predictor, S = the model's input side, seed, the output folder) -> its Picture, written there.


def draw_threshold(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    found = predictor.predict_masks([A])
    cells = [
        Cell(fit(scene.image), "image"),
        Cell(fit(heatmap(found.probs[0])), f'probability of "{A}"'),
        overlay_cell(scene.image, [found.masks[0]], f"mask: probability > {found.threshold:g}"),
    ]
    title = f"threshold: the model's map and its mask ({threshold_text(found)})"
    return finish("threshold", folder, title, cells, 3, {"threshold": found.masks[0]})


def draw_expressions(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    operators = ("|", "-", "&")
    found = predictor.predict_masks([A, B, *(f"{A} {operator} {B}" for operator in operators)])
    cells = [
        Cell(fit(scene.image), "image"),
        Cell(fit(heatmap(found.probs[0])), f'a = "{A}"'),
        Cell(fit(heatmap(found.probs[1])), f'b = "{B}"'),
    ]
    cells += [overlay_cell(scene.image, [mask], f"a {op} b") for op, mask in zip(operators, found.masks[2:])]
    title = f"expressions: a | b = max, a - b = min(a, 1 - b), a & b = min; {threshold_text(found)}"
    masks = dict(zip(("a", "b", "or", "minus", "and"), found.masks))
    return finish("expressions", folder, title, cells, 3, masks)


def draw_grow_shrink(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    plain = predictor.predict_masks([A])
    grown = predictor.predict_masks([A], options=MaskOptions(grow=GROW)).masks[0]
    shrunk = predictor.predict_masks([A], options=MaskOptions(shrink=SHRINK)).masks[0]
    box = crop_box(scene.truths[0], 0.2)
    image = Image.fromarray(crop(np.asarray(scene.image), box))
    reference = crop(plain.masks[0], box)
    cells = [overlay_cell(image, [reference], "threshold")]
    cells += [
        outlined(overlay_cell(image, [crop(mask, box)], label), reference)
        for mask, label in ((grown, f"--grow {GROW}"), (shrunk, f"--shrink {SHRINK}"))
    ]
    title = f'grow / shrink by a disk ("{A}"; white: the threshold\'s outline; {threshold_text(plain)})'
    return finish(
        "grow_shrink", folder, title, cells, 3, {"threshold": plain.masks[0], "grow": grown, "shrink": shrunk}
    )


def draw_feather(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    found = predictor.predict_masks([A], options=MaskOptions(feather=FEATHER))
    box = crop_box(scene.truths[0], 0.2)
    soft = probability_png(crop(found.soft[0], box), 8)
    cells = [
        Cell(fit(Image.fromarray(crop(np.asarray(scene.image), box))), "image"),
        Cell(fit(mask_image(crop(found.masks[0], box)), resample=Image.NEAREST), "mask (hard edge)"),
        Cell(fit(soft, resample=Image.NEAREST), f"--feather {FEATHER}: soft mask"),
    ]
    title = f'feather: a soft edge {FEATHER} px wide, for inpainting ("{A}"; {threshold_text(found)})'
    return finish("feather", folder, title, cells, 3, {"mask": found.masks[0], "soft": found.soft[0] > 0})


def draw_fill_holes(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = placed_scene(np.random.default_rng(seed + 1), round(3.75 * side), round(2.8 * side), HOLE_SHAPES)
    predictor.set_image(scene.image)
    phrase = scene.phrases[0]
    plain = predictor.predict_masks([phrase])
    filled = predictor.predict_masks([phrase], options=MaskOptions(fill_holes=True)).masks[0]
    cells = [
        Cell(fit(scene.image), "image"),
        overlay_cell(scene.image, [plain.masks[0]], f"threshold: {plain.masks[0].sum()} px"),
        overlay_cell(scene.image, [filled], f"--fill-holes: {filled.sum()} px"),
    ]
    title = f'fill holes: background the mask encloses joins it ("{phrase}"; {threshold_text(plain)})'
    return finish("fill_holes", folder, title, cells, 3, {"threshold": plain.masks[0], "filled": filled})


def draw_min_area(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    min_area = round(MIN_AREA_SHARE * scene.image.width * scene.image.height)
    plain = predictor.predict_masks([MIN_AREA_PHRASE], MIN_AREA_THRESHOLD).masks[0]
    options = MaskOptions(min_area=min_area)
    kept = predictor.predict_masks([MIN_AREA_PHRASE], MIN_AREA_THRESHOLD, options).masks[0]
    cells = [
        Cell(fit(scene.image), "image"),
        ringed(
            overlay_cell(scene.image, [plain], f"--threshold {MIN_AREA_THRESHOLD:g}: {components(plain)} components"),
            plain & ~kept,
        ),
        overlay_cell(scene.image, [kept], f"--min-area {min_area}: {components(kept)} left"),
    ]
    title = f'minimum area: components under {min_area} px dropped ("{MIN_AREA_PHRASE}"; white rings: those)'
    picture = finish("min_area", folder, title, cells, 3, {"threshold": plain, "kept": kept})
    picture.options = {"threshold": MIN_AREA_THRESHOLD, "min_area": min_area}
    return picture


def draw_instances(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    phrase = "circle"
    every = predictor.predict_masks([phrase], options=MaskOptions(instances=True)).results[0].mask
    best = predictor.predict_masks([phrase], options=MaskOptions(max_instances=MAX_INSTANCES)).results[0].mask
    legend = [f"{instance.label}: {instance.area} px" for instance in every.instances]
    cells = [
        Cell(fit(scene.image), "image"),
        overlay_cell(scene.image, every.instance_masks(), "--instances (by area)", legend),
        overlay_cell(scene.image, best.instance_masks(), f"--max-instances {MAX_INSTANCES}", legend[:MAX_INSTANCES]),
    ]
    title = f'instances: the connected components of "{phrase}", largest first; the best K kept'
    return finish("instances", folder, title, cells, 3, {"instances": every.mask, "kept": best.mask})


def draw_guided(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    bilinear = predictor.predict_masks([A])
    guided = predictor.predict_masks([A], refine="guided").masks[0]
    truth = scene.truths[0]
    left, top, right, bottom = crop_box(truth, 0.0)
    radius, span = (right - left) / 2, round(EDGE_CROP * (right - left))
    corner = (round(left + radius * (1 - 0.5**0.5) - span / 2), round(top + radius * (1 - 0.5**0.5) - span / 2))
    edge = (*corner, corner[0] + span, corner[1] + span)  # a square on the circle's upper left arc
    image = Image.fromarray(crop(np.asarray(scene.image), edge))
    framed = fit(scene.image)
    scale = framed.width / scene.image.width
    ImageDraw.Draw(framed).rectangle([round(v * scale) for v in edge], outline=(255, 255, 255), width=2)
    cells = [Cell(framed, "image (white: the crop)")]
    cells += [
        outlined(overlay_cell(image, [crop(mask, edge)], label), crop(truth, edge))
        for mask, label in ((bilinear.masks[0], "bilinear (--refine none)"), (guided, "--refine guided"))
    ]
    title = f'guided refinement ("{A}"; white: the true edge; {threshold_text(bilinear)})'
    return finish("guided", folder, title, cells, 3, {"bilinear": bilinear.masks[0], "guided": guided})


def draw_tiles(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = make_scene(np.random.default_rng(seed), 8 * side, 6 * side, 8, (0.09 * side, 0.22 * side))
    phrases = scene.phrases[:3]
    predictor.set_image(scene.image, encode=False)
    one = predictor.predict_masks(phrases)
    tiled = predictor.predict_masks(phrases, tile=side)
    wide = 3 * CELL // 2
    shown = fit(scene.image, wide).size  # a crop of this size at the source's scale (1:1) around the first shape
    rows, cols = np.nonzero(scene.truths[0])
    left = int(np.clip(cols.mean() - shown[0] / 2, 0, scene.image.width - shown[0]))
    top = int(np.clip(rows.mean() - shown[1] / 2, 0, scene.image.height - shown[1]))
    box = (left, top, left + shown[0], top + shown[1])
    image = Image.fromarray(crop(np.asarray(scene.image), box))
    cells = [
        overlay_cell(scene.image, list(one.masks), "one pass", phrases, wide),
        overlay_cell(scene.image, list(tiled.masks), f"--tile ({side}-px windows)", phrases, wide),
        overlay_cell(image, [crop(mask, box) for mask in one.masks], "one pass (a crop at 1:1)", (), wide),
        overlay_cell(image, [crop(mask, box) for mask in tiled.masks], "--tile (a crop at 1:1)", (), wide),
    ]
    width, height = scene.image.size
    title = f"tiles: a {width} x {height} image, small shapes; {threshold_text(one)}"
    return finish("tiles", folder, title, cells, 2, {"one_pass": one.masks, "tiles": tiled.masks})


def draw_cutout(predictor: Predictor, side: int, seed: int, folder: Path) -> Picture:
    scene = main_scene(side, seed)
    predictor.set_image(scene.image)
    found = predictor.predict_masks([A], options=MaskOptions(feather=CUTOUT_FEATHER))
    rgba = cutout(scene.image, found.soft[0])
    backdrop = checkerboard(rgba.size).convert("RGBA")
    cells = [
        Cell(fit(scene.image), "image"),
        Cell(
            fit(Image.fromarray(np.round(found.soft[0] * 255).astype(np.uint8))), f"alpha (--feather {CUTOUT_FEATHER})"
        ),
        Cell(fit(Image.alpha_composite(backdrop, rgba).convert("RGB")), "--save cutout (RGBA)"),
    ]
    title = f'cut-out: the image with the soft mask as alpha ("{A}"; {threshold_text(found)})'
    return finish("cutout", folder, title, cells, 3, {"alpha": found.soft[0] > 0})


def finish(name: str, folder: Path, title: str, cells: Sequence[Cell], columns: int, masks: dict) -> Picture:
    path = folder / f"{name}.png"
    return Picture(name, path, save(panel(title, cells, columns), path), masks)


DRAWERS = {
    "threshold": draw_threshold, "expressions": draw_expressions, "grow_shrink": draw_grow_shrink,
    "feather": draw_feather, "fill_holes": draw_fill_holes, "min_area": draw_min_area, "instances": draw_instances,
    "guided": draw_guided, "tiles": draw_tiles, "cutout": draw_cutout,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Picture]:
    """Write one PNG per step of STEPS into --out; returns the pictures by step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory or hub id (CLIPSeg.from_pretrained)")
    parser.add_argument("--out", default="docs/masks", help="the folder of the PNGs (made if missing)")
    parser.add_argument("--seed", type=int, default=0, help="the scenes' seed")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    predictor = Predictor(CLIPSeg.from_pretrained(args.model).eval())
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {}
    for name in STEPS:
        started = time.perf_counter()
        pictures[name] = DRAWERS[name](predictor, predictor.transform.size, args.seed, folder)
        kilobytes = pictures[name].path.stat().st_size / 1000
        width, height = pictures[name].size
        print(f"{pictures[name].path}: {width} x {height}, {kilobytes:.0f} KB ({time.perf_counter() - started:.1f} s)")
    return pictures


if __name__ == "__main__":
    main()
