"""What the web app takes from a client, checked before use; bad input is an `InputError` whose message the page
shows as it is.

Files come as Gradio payloads (a dict with the `path` of an upload) or paths. `read_upload` reads one only when it
is a regular file of at most MAX_UPLOAD_BYTES inside the allowed folders (the page allows Gradio's upload folder
alone): symlinks are resolved before the folder check, and the file is opened without following a symlink or
blocking (a FIFO cannot hang the server) and checked on the open descriptor. Images are decoded by
`clipseg.images.open_rgb` (its pixel limit refuses decompression bombs). Text: at most MAX_PROMPTS prompts, each within
the tokenizer's limits (`tokenizer.check_phrase`); prompt expressions parsed (`parse_expressions`); the threshold a
number in [0, 1).
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipseg.expressions import Expression, ExpressionError, distinct_phrases, parse
from clipseg.images import MAX_IMAGE_PIXELS, UnreadableImage, open_rgb
from clipseg.tokenizer import MAX_PHRASE_CHARS, TextTooLong, check_phrase

MAX_PROMPTS = 20
MAX_PROMPT_TEXT = MAX_PROMPTS * (MAX_PHRASE_CHARS + 1)  # the prompt box, in characters
MAX_LAYERS = 8  # painted layers of a support image read at most (the page's editor sends one)
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Gradio refuses larger uploads (app.launch); no larger file is read


class InputError(ValueError):
    """Input the page cannot use; its message is shown in the page as it is."""


def parse_prompts(text: Any) -> list[str]:
    """Prompts typed one per line and/or comma-separated -> stripped, non-empty, first occurrence kept. Raises
    InputError for text that is not a string or is over a limit (MAX_PROMPT_TEXT, `tokenizer.check_phrase`)."""
    if text is not None and not isinstance(text, str):
        raise InputError(f"The prompts must be text, got {type(text).__name__}.")
    if len(text or "") > MAX_PROMPT_TEXT:
        raise InputError(
            f"The prompts are {len(text):,} characters long; at most {MAX_PROMPT_TEXT:,} ({MAX_PROMPTS} prompts of at "
            f"most {MAX_PHRASE_CHARS:,} characters)."
        )
    pieces = (piece.strip() for line in (text or "").splitlines() for piece in line.split(","))
    phrases = list(dict.fromkeys(piece for piece in pieces if piece))
    for phrase in phrases:
        try:
            check_phrase(phrase)
        except TextTooLong as err:
            raise InputError(f"{str(err)[0].upper()}{str(err)[1:]}.") from err
    return phrases


def parse_expressions(text: Any) -> list[Expression]:
    """The prompt box -> prompt expressions, one per line; a line without operators is split on commas as plain
    prompts are (`parse_prompts`: "a cat, the sofa" is two prompts), a line with operators (`cat | dog`, `a & b`,
    `a - b`, `car:1.5`, parentheses) is one expression. Repeats are dropped. Raises InputError (a syntax error names
    its line and column, with a caret under it) and for more than MAX_PROMPTS phrases."""
    parse_prompts(text)  # its type and length
    expressions: list[Expression] = []
    for number, line in enumerate((text or "").splitlines(), 1):
        try:
            expression = parse(line) if line.strip() else None
        except ExpressionError as err:
            raise InputError(f"Line {number} of the prompts: {err}") from err
        if expression is None or expression.is_plain:
            expressions += [parse(phrase) for phrase in parse_prompts(line)]
        else:
            expressions.append(expression)
    expressions = list({str(e): e for e in expressions}.values())
    phrases = distinct_phrases(expressions)
    for phrase in phrases:
        parse_prompts(phrase)  # the tokenizer's limits
    if len(phrases) > MAX_PROMPTS:
        raise InputError(f"{len(phrases)} prompts given; at most {MAX_PROMPTS} at once: split them over several runs.")
    return expressions


def check_threshold(threshold: Any) -> None:
    """Raise InputError unless `threshold` is a number in [0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold < 1:
        raise InputError(f"The threshold must be in [0, 1), got {threshold!r}.")


def read_upload(path: str | os.PathLike, what: str, folders: Sequence[Path] | None = None) -> bytes:
    """The bytes of a regular file of at most MAX_UPLOAD_BYTES, inside one of `folders` when given (after symlinks
    are resolved). The file is opened without following a symlink and without blocking (a FIFO cannot hang the
    server), and checked on the open descriptor before it is read."""
    not_uploaded = InputError(f"{what} was not uploaded to this page: upload the file.")
    try:
        path = os.path.realpath(path)
    except (OSError, ValueError) as err:  # e.g. a NUL character
        raise not_uploaded from err
    if folders is not None and not any(Path(path).is_relative_to(folder) for folder in folders):
        raise not_uploaded
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    too_large = InputError(f"{what} is over {MAX_UPLOAD_BYTES // 2**20} MB, the upload limit: downscale it.")
    try:
        descriptor = os.open(path, flags)
    except OSError as err:
        raise InputError(f"{what}: the uploaded file cannot be read ({err.strerror}); upload it again.") from err
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} is not a regular file: upload an image file.")
        if info.st_size > MAX_UPLOAD_BYTES:
            raise too_large
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_UPLOAD_BYTES + 1)
    except OSError as err:
        raise InputError(f"{what}: the uploaded file cannot be read ({err.strerror}); upload it again.") from err
    finally:
        os.close(descriptor)
    if len(data) > MAX_UPLOAD_BYTES:  # it grew while being read
        raise too_large
    return data


def payload_file(payload: Any, what: str, folders: Sequence[Path] | None = None) -> tuple[bytes, str] | None:
    """A file input (a Gradio file payload: a dict with its `path`, a path, or None) -> (its bytes, its original
    file name) by `read_upload`, or None when nothing was given. A payload without a path (e.g. a data: URL) is
    refused: the page takes only uploads."""
    if payload is None:
        return None
    if isinstance(payload, str | os.PathLike):
        path, name = payload, Path(payload).name
    elif isinstance(payload, dict):
        path, name = payload.get("path"), payload.get("orig_name")
    else:
        path, name = None, None
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise InputError(f"{what} was not uploaded to this page: upload the file.")
    name = name if isinstance(name, str) and name else Path(path).name
    return read_upload(path, what, folders), name


def read_rgb(data: bytes, name: str, what: str) -> Image.Image:
    """Image file bytes -> upright RGB (`clipseg.images.open_rgb`: EXIF rotation, alpha on black, size limit)."""
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix) as file:
        file.write(data)
        file.flush()
        try:
            return open_rgb(file.name)
        except UnreadableImage as err:
            fix = "Downscale it" if err.reason.startswith("too large") else "Upload a JPEG, PNG or WebP image"
            raise InputError(f"{what} {name!r} cannot be used: {err.reason}. {fix}.") from err


def painted_mask(
    layers: Sequence[Any], size: tuple[int, int], folders: Sequence[Path] | None = None
) -> np.ndarray | None:
    """The object painted on a support image: (H, W) bool, True where any editor layer is not transparent.

    layers: Gradio ImageEditor layer payloads (RGBA images; at most MAX_LAYERS), read by `payload_file` from
    `folders`; size: (W, H) of the support image (layers of another size, e.g. a scaled canvas, are resized
    nearest). None when no layer was given."""
    if not isinstance(layers, list | tuple) or len(layers) > MAX_LAYERS:
        raise InputError(f"The support image's painted layers must be a list of at most {MAX_LAYERS} images.")
    mask = None
    for layer in layers:
        found = payload_file(layer, "The painted mask", folders)
        if found is None:
            continue
        try:
            with Image.open(io.BytesIO(found[0])) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
                alpha = np.asarray(image.getchannel("A") if "A" in image.getbands() else image.convert("L")) > 0
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"The painted mask cannot be read ({err}); paint it again.") from err
        if alpha.shape != (size[1], size[0]):
            alpha = np.asarray(Image.fromarray(alpha).resize(size, Image.NEAREST))
        mask = alpha if mask is None else mask | alpha
    return mask
