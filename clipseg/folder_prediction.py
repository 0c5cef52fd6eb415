"""predict.py's run over its inputs, on one process or as one rank of a torchrun job: this rank's images taken from
the streamed walk (clipseg/folders.py), segmented a batch at a time, each image's files and its `summary.jsonl`
line written as soon as it is done, images an earlier attempt completed skipped with `resume`, and at the end the
ranks' lines merged into OUT/summary.jsonl and summarised in summary.json by rank 0.

Each image goes through the library's mask pipeline (`Predictor.predict_masks`: all the phrases of all the text
prompt expressions decoded from one encoding of the image, or of each window with tiling; guided or SAM
refinement; the post-processing of `FolderOptions.masks`); image prompts take the same steps on their maps. Its
summary line records, per prompt, the parsed expression, the mask's record (threshold, area, instances) and with
`coco` the COCO annotations of its masks, which rank 0 gathers into OUT/coco.json at the end (`write_coco`).

    run = predict_folder(predictor, conditional, prompts, inputs, options, world)   # FolderOptions: flags
    run.processed, run.reused, run.skipped                                          # this rank's counts
    counts = finish_folder(run, header, summary_path)                               # merged; summary.json

Which rank does an image: `stable_hash(its path as given) % world_size` (clipseg/distributed.py), decided before
the file is opened, so a rerun with the same number of processes gives every rank the same images, on any node.
Where its files go: OUT/<output_name>/ (clipseg/folders.py: the file name, or the whole path as given when there
are several inputs), so the same on one process and many.

Resuming: the flags that shape the outputs are kept in OUT/run.json; `--resume` with other flags stops with a
message instead of mixing the outputs of two settings. An image is done again unless its line is in the summary
and all of its files are there and not empty (clipseg/folders.py).

summary.json is written from the merged summary.jsonl as a stream (its "images" and "errors" read from the file a
line at a time), so no step holds every image's entry in memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from clipseg.distributed import (
    Distributed,
    GlobalProgress,
    barrier,
    check_same_everywhere,
    files_digest,
    gather_blocks,
    model_digest,
    sequence_digest,
)
from clipseg.folders import (
    COCO_NAME,
    RUN_FILE,
    STAMP_FIELD,
    SUMMARY_JSON_NAME,
    SUMMARY_NAME,
    CompletedImages,
    InputEntry,
    MergeCounts,
    SummaryLog,
    input_stamp,
    iter_inputs,
    merge_summaries,
    output_name,
    rank_summary_path,
    read_summary,
    start_summaries,
    summary_line,
)
from clipseg.images import UnreadableImage, open_rgb
from clipseg.mask_formats import CocoDocument
from clipseg.mask_pipeline import PipelineOptions, mask_from_map
from clipseg.outputs import atomic_write, json_text, printable, write_text
from clipseg.postprocess import MaskResult
from clipseg.prediction_outputs import DEFAULT_SAVE, Prompt, image_files, image_summary, write_image_outputs
from clipseg.predictor import Predictor
from clipseg.refine import SamRefiner, guided_refine
from clipseg.tiling import TooManyWindows, should_tile, tiled_probabilities
from clipseg.transforms import NonFiniteOutput


class ResumeMismatch(ValueError):
    """--resume into an output folder made with other flags; the message names them."""


@dataclass
class FolderOptions:
    """The flags of a run that shape its outputs (kept in OUT/run.json) and where they go."""

    out: Path
    threshold: float
    prob_bits: int
    batch_size: int
    resume: bool = False
    settings: dict = field(default_factory=dict)  # model, precision, image size, ...: compared on --resume
    masks: PipelineOptions = field(default_factory=PipelineOptions)  # post-processing (its threshold), refine, tiles
    save: tuple[str, ...] = DEFAULT_SAVE  # the files per prompt (`clipseg.prediction_outputs.SAVE_KINDS`)
    coco: str | None = None  # "rle" or "polygons": COCO annotations of every mask, in OUT/coco.json
    sam: SamRefiner | None = None  # with masks.refine == "sam"

    def shaping(self) -> dict:
        """Everything that shapes the outputs, as strict JSON (OUT/run.json; compared across ranks)."""
        masks = self.masks.to_dict()
        masks["mask"] = {key: value for key, value in masks["mask"].items() if key != "threshold"}  # said once
        shaping = {**self.settings, "threshold": self.threshold, "prob_bits": self.prob_bits}
        return shaping | {"pipeline": masks, "save": list(self.save), "coco": self.coco}


@dataclass
class FolderRun:
    """What this rank did: images segmented now, images an earlier attempt completed, inputs skipped; why it
    stopped early (`stopped`, a model whose output is not finite)."""

    processed: int = 0
    reused: int = 0
    skipped: int = 0
    stopped: str | None = None
    large_images: int = 0  # images much larger than the model's input, segmented without --tile


def check_same_predictor(
    world: Distributed, predictor: Predictor, prompts: Sequence[Prompt], options: FolderOptions, inputs: Sequence[str]
) -> None:
    """Stop every rank (`RanksDisagree`) unless all were started with the same model, flags, prompts and inputs."""
    if not world.enabled:
        return
    model = predictor.model
    if hasattr(model, "directory"):  # an ONNX export (clipseg/onnx/backend.py)
        digest = files_digest(path for path in Path(model.directory).iterdir() if path.is_file())
    else:
        digest = model_digest(model)
    flags = options.shaping() | {"batch_size": options.batch_size, "resume": options.resume}
    flags["prompts"] = [p.slug for p in prompts]
    check_same_everywhere(world, model=digest, flags=flags, data=sequence_digest(inputs))


def start_output(options: FolderOptions, world: Distributed) -> CompletedImages:
    """Rank 0 prepares OUT (run.json checked or written; the summaries of an earlier attempt folded in with
    --resume, removed without), then every rank loads the images it has nothing left to do for."""
    problem = None
    if world.is_main:
        try:
            _check_run_file(options)
            start_summaries(options.out, options.resume)
        except (ResumeMismatch, OSError) as err:
            problem = str(err)
    problem = next((p for p in gather_blocks({world.rank: problem}, world) if p), None)
    if problem:
        raise ResumeMismatch(problem)
    if not options.resume:
        return CompletedImages([])
    return CompletedImages.load(options.out, world.owns)


def _check_run_file(options: FolderOptions) -> None:
    path, settings = options.out / RUN_FILE, options.shaping()
    if options.resume and path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ResumeMismatch(f"--resume: cannot read {path} ({err})") from err
        if not isinstance(before, dict):
            raise ResumeMismatch(f"--resume: {path} is not a JSON object; choose another --out")
        changed = sorted(key for key in {*before, *settings} if before.get(key) != settings.get(key))
        if changed:
            raise ResumeMismatch(
                f"--resume: {options.out} was made with other settings ({', '.join(changed)} differ; see {path}); "
                "resume with the same flags, or choose another --out"
            )
        return
    options.out.mkdir(parents=True, exist_ok=True)
    write_text(path, json_text(settings, indent=2) + "\n")


def predict_folder(
    predictor: Predictor,
    conditional: Tensor,
    prompts: Sequence[Prompt],
    inputs: Sequence[str],
    options: FolderOptions,
    world: Distributed,
) -> FolderRun:
    """Segment this rank's images of `inputs` (module docstring). NaN or infinite model outputs end the walk with
    `run.stopped` set; the other ranks finish theirs. A collective at the end (the progress bar)."""
    completed = start_output(options, world)
    run, several = FolderRun(), len(inputs) > 1
    progress = GlobalProgress(world, unit="image", desc="images")
    batch: list[tuple[InputEntry, Path]] = []
    with SummaryLog(rank_summary_path(options.out, world.rank)) as log:
        for entry in iter_inputs(inputs, owns=world.owns):
            if run.stopped:
                break
            if entry.error:
                _skip(run, log, entry.key, entry.error)
                progress.update(1)
                continue
            folder = options.out / output_name(entry.path, several)
            if completed.is_complete(entry.key, image_files(folder, prompts, options.save), input_stamp(entry.path)):
                run.reused += 1
                progress.update(1)
                continue
            batch.append((entry, folder))
            if len(batch) == options.batch_size:
                _segment(predictor, conditional, prompts, batch, options, run, log, progress)
                batch = []
        if batch and not run.stopped:
            _segment(predictor, conditional, prompts, batch, options, run, log, progress)
    progress.close()
    return run


def _segment(predictor, conditional, prompts, batch, options: FolderOptions, run: FolderRun, log, progress) -> None:
    """Read, segment and write a batch of images, one at a time; each image's summary line right after its files.
    `conditional`: the image prompts' vectors (None without)."""
    for entry, folder in batch:
        stamp = input_stamp(entry.path)  # before reading: a file replaced meanwhile is done again on --resume
        try:
            image = open_rgb(entry.path)
        except UnreadableImage as err:
            _skip(run, log, entry.key, err.reason)
            progress.update(1)
            continue
        try:
            note_large_image(predictor, image, options, run)
            found = image_masks(predictor, image, prompts, conditional, options)
        except NonFiniteOutput as err:
            run.stopped = f"stopped after {run.processed} image(s): {err}"
            return
        except TooManyWindows as err:
            _skip(run, log, entry.key, str(err))
            progress.update(1)
            continue
        probs = np.stack([probs for probs, *_ in found])
        masks, soft = [result.mask for _, result, _ in found], [result.soft for _, result, _ in found]
        try:
            written = write_image_outputs(image, probs, prompts, folder, masks, options.prob_bits, soft, options.save)
        except OSError as err:
            _skip(run, log, entry.key, f"cannot write its outputs ({err})")
        else:
            entries = [e | record for e, (*_, record) in zip(written["prompts"], found)]
            size = predictor.transform.input_size(*image.size)
            line = image_summary(entry.key, image.size, size, entries) | {"overlay": written["overlay"]}
            if stamp is not None:
                line[STAMP_FIELD] = stamp
            if options.coco:
                line["coco"] = coco_records(entry.key, image.size, prompts, found, options.coco)
            log.write(line)
            run.processed += 1
        progress.update(1)


def note_large_image(predictor: Predictor, image: Image.Image, options: FolderOptions, run: FolderRun) -> None:
    """Once per run, at the first image much larger than the model's input (`should_tile`) when --tile is off: a
    note that tiles may find small objects (the closing line counts such images)."""
    if options.masks.tile is not None or not should_tile(image.height, image.width, predictor.transform.size):
        return
    run.large_images += 1
    if run.large_images == 1:
        tqdm.write(
            f"note: {image.width}x{image.height} is much larger than the model's input ({predictor.transform.size} "
            "px): --tile may find small objects (said once; the closing line counts such images)",
            file=sys.stderr,
        )


def image_masks(
    predictor: Predictor,
    image: Image.Image,
    prompts: Sequence[Prompt],
    conditional: Tensor | None,
    options: FolderOptions,
) -> list[tuple[np.ndarray, MaskResult, dict]]:
    """Per prompt of one image, in order: its (H, W) probability map (an expression's evaluated map), its
    `MaskResult` and the record its summary entry gains (the parsed expression, the mask's threshold, area and
    instances, SAM's scores). Text prompts go through `Predictor.predict_masks` (one encoding of the image, or of
    each window with tiles), image prompts (`conditional`) through the same steps on their maps."""
    pipeline = options.masks
    predictor.set_image(image, encode=pipeline.tile is None)
    found = []
    expressions = [prompt.expression for prompt in prompts if prompt.kind == "text"]
    if expressions:
        prediction = predictor.predict_masks(
            expressions, options.threshold, pipeline.mask, pipeline.refine, pipeline.tile, pipeline.tile_overlap,
            pipeline.tile_context, options.sam,
        )  # fmt: skip
        found += [(result.probs, result.mask, result.summary()) for result in prediction.results]
    if conditional is not None:
        pixels = np.asarray(image)
        if pipeline.tile is None:
            maps = predictor.predict(conditional=conditional)
        else:
            window = lambda crop: predictor.window_probabilities(crop, conditional)  # noqa: E731
            maps = tiled_probabilities(pixels, window, pipeline.tile, pipeline.overlap, pipeline.tile_context)
        if pipeline.refine == "guided":
            maps = guided_refine(maps, pixels)
        for probs in maps:
            result, refined = mask_from_map(pixels, probs, pipeline, options.sam)
            record = result.summary() | ({"sam_scores": [round(s, 6) for s in refined.scores]} if refined else {})
            found.append((probs, result, record))
    return found


def coco_records(
    name: str,
    size: tuple[int, int],
    prompts: Sequence[Prompt],
    found: Sequence[tuple[np.ndarray, MaskResult, dict]],
    segmentation: str,
) -> list[dict]:
    """The COCO annotations of one image's masks (`CocoDocument.records`: one per instance when instances were
    found, else one per non-empty mask; category = the prompt's label)."""
    document = CocoDocument()
    image_id = document.add_image(name, *size)
    for prompt, (_, result, _) in zip(prompts, found):
        document.add_result(image_id, prompt.label, result, segmentation)
    return document.records()


def _skip(run: FolderRun, log: SummaryLog, key: str, reason: str) -> None:
    tqdm.write(f"skipped {key}: {reason}", file=sys.stderr)
    log.write({"image": key, "error": reason})
    run.skipped += 1


# ------------------------------------------------------------------------------------------------ the summary


def finish_folder(run: FolderRun, world: Distributed, out: Path, header: dict, destination: str | None) -> dict:
    """After every rank's walk: rank 0 merges the ranks' lines into OUT/summary.jsonl and writes summary.json
    (`header`, then "processed", "skipped", "images", "errors") to `destination` (None: OUT/summary.json; "-":
    stdout). Returns, on every rank, {"processed", "skipped", "stopped", "summary"} of the whole job ("summary":
    where it went, None when it could not be written)."""
    barrier(world)  # every rank's lines are written
    stops = [s for s in gather_blocks({world.rank: run.stopped}, world) if s]
    result = {"stopped": stops[0] if stops else None, "summary": None, "processed": 0, "skipped": 0}
    if world.is_main:
        counts = merge_summaries(out)
        header = {**header, "stopped": result["stopped"]}
        result |= {"processed": counts.images, "skipped": counts.errors}
        result["summary"] = write_summary_json(
            out / SUMMARY_NAME, header, counts, destination or str(out / SUMMARY_JSON_NAME)
        )
        if header.get("coco"):
            result["coco"] = write_coco(out / SUMMARY_NAME, out / COCO_NAME)
    shared = gather_blocks({world.rank: result if world.is_main else None}, world)[0]
    return shared


def summarise_unreadable(out: Path, header: dict, errors: dict[str, str], destination: str | None) -> str | None:
    """When no input can be read (before any model is loaded): OUT/summary.jsonl with one error line per input and
    summary.json as `finish_folder` writes it. Returns where the summary went (None when it could not be written)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = out / SUMMARY_NAME
    records = b"".join(summary_line({"image": key, "error": reason}) for key, reason in errors.items())
    atomic_write(lines, lambda tmp: Path(tmp).write_bytes(records))
    counts = MergeCounts(errors=len(errors))
    return write_summary_json(lines, {**header, "stopped": None}, counts, destination or str(out / SUMMARY_JSON_NAME))


def write_summary_json(lines: Path, header: dict, counts: MergeCounts, destination: str) -> str | None:
    """summary.json from the merged `lines` (summary.jsonl): `header`, the counts, "images" and "errors" streamed
    from the file. Returns where it went ("stdout" for "-"), None when it could not be written (then printed)."""
    fields = {**header, "processed": counts.images, "skipped": counts.errors}

    def write(handle) -> None:
        handle.write(json_text(fields, indent=2, ensure_ascii=False)[:-2] + ",\n")
        for name, errors in (("images", False), ("errors", True)):
            handle.write(f'  "{name}": [')
            first = True
            for record in read_summary(lines):
                record.pop("coco", None)  # in OUT/coco.json
                if ("error" in record) == errors:
                    handle.write(("\n    " if first else ",\n    ") + json_text(record, ensure_ascii=False))
                    first = False
            handle.write("\n  ]" if not first else "]")
            handle.write(",\n" if not errors else "\n}\n")

    if destination == "-":
        write(sys.stdout)
        return "stdout"
    try:
        atomic_write(Path(destination), lambda tmp: _write_to(tmp, write))
    except OSError as err:
        print(f"error: cannot write the summary ({err}); here it is instead:", file=sys.stderr)
        write(sys.stdout)
        return None
    return destination


def write_coco(lines: Path, path: Path) -> str | None:
    """OUT/coco.json from the merged `lines`' COCO records (one document: the images in summary order, categories =
    prompts). Returns its path, None when it could not be written (said on stderr). A line without the image's size
    or with damaged annotations (edited by hand) is left out with a note."""
    document, damaged = CocoDocument(), []
    for record in read_summary(lines):
        if "error" in record:
            continue
        size, annotations = (record.get("width"), record.get("height")), record.get("coco", [])
        if not all(type(side) is int and side > 0 for side in size) or not _annotation_records(annotations):
            damaged.append(record["image"])
            continue
        image_id = document.add_image(record["image"], *size)
        for annotation in annotations:
            document.add_record(image_id, annotation)
    if damaged:
        print(
            f"note: {len(damaged)} line(s) of {lines} without the image's size or with damaged COCO annotations are "
            f"left out of {path.name} (first: {printable(damaged[0], 80)})",
            file=sys.stderr,
        )
    try:
        document.write(path)
    except OSError as err:
        print(f"error: cannot write {path} ({err})", file=sys.stderr)
        return None
    return str(path)


def _annotation_records(annotations: object) -> bool:
    """Whether `annotations` is a list of `CocoDocument.records()`: objects, each naming its category."""
    return isinstance(annotations, list) and all(isinstance(a, dict) and "category" in a for a in annotations)


def _write_to(path: str, write) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        write(handle)
