"""The index of a PhraseCut split: `refer_<split>.json` parsed once into flat memory-mapped arrays.

PhraseCut's JSON holds every task with its polygons (344 MB for the train split). The first use of a split streams
it (bounded memory) into flat numpy arrays under `<VGPhraseCut_v0>/.clipseg_index/<split>/` (or a per-user cache dir
when the data dir is read-only), checking each image's size once. Later runs memory-map those arrays in well under a
second, and DataLoader workers share their pages instead of copying millions of Python objects. The index is rebuilt
when the JSON files change. dataset.PhraseCut reads tasks through `TaskTable`.

Bad annotations are left out while indexing and counted (`polygon_defect`): a polygon with a NaN, infinite or absurdly
far coordinate (beyond `rasterise.MAX_COORDINATE`), or of zero area (fewer than 3 vertices, or all on one line), would
draw nothing (or a stray line) and train on an empty target. Such a polygon is dropped and counted per task; the task
keeps its other polygons, and a task with no usable polygon left is excluded (`TaskTable.exclusion_reasons`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipseg.images import upright_size
from clipseg.metrics import PHRASE_TYPES
from clipseg.outputs import exclusive_lock, json_text, printable
from clipseg.rasterise import MAX_COORDINATE

DATA_SUBDIR = Path("data") / "VGPhraseCut_v0"
SPLITS = ("train", "val", "test", "miniv")
DEFAULT_PHRASECUT_ROOT = "PhraseCutDataset"  # where the official download script puts it
DEFAULT_SYNTHETIC_ROOT = "synthetic_phrasecut"  # where `python -m clipseg.synthetic phrasecut` writes by default
INDEX_VERSION = 3  # 2: bad polygons dropped and counted; 3: far-out coordinates count as non-finite
NON_FINITE, ZERO_AREA = "non-finite or out-of-range coordinates", "zero area"
DOWNLOAD_HINT = (
    "Get PhraseCut with its official download script (about 75k Visual Genome images, ~20 GB): "
    "`git clone https://github.com/ChenyunWu/PhraseCutDataset && cd PhraseCutDataset && python download_dataset.py`, "
    "then pass the clone's directory as the data root. For generated data in the same format run "
    "`python -m clipseg.synthetic phrasecut --root synthetic_phrasecut`."
)


def find_data_dir(root: str | os.PathLike) -> Path:
    """`root` (a dir containing data/VGPhraseCut_v0/, or that dir itself) -> the VGPhraseCut_v0 dir, or a
    FileNotFoundError saying where the data must be and how to get it."""
    root = Path(root)
    for candidate in (root / DATA_SUBDIR, root):
        if (candidate / "image_data_split.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"PhraseCut not found under {root}: expected {root / DATA_SUBDIR}/ with refer_<split>.json, "
        f"image_data_split.json and images/. {DOWNLOAD_HINT}"
    )


def iter_json_array(path: Path, chunk_chars: int = 1 << 24) -> Iterator[dict]:
    """Stream the elements of a top-level JSON list without holding the whole document (bounded memory)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as file:
        buffer, position = file.read(chunk_chars), 0

        def skip_separators() -> bool:
            nonlocal buffer, position
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n,":
                    position += 1
                if position < len(buffer):
                    return True
                buffer, position = file.read(chunk_chars), 0
                if not buffer:
                    return False

        if not skip_separators() or buffer[position] != "[":
            raise ValueError(f"{path}: expected a JSON list of tasks")
        position += 1
        while skip_separators():
            if buffer[position] == "]":
                return
            try:
                element, position = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as err:
                more = file.read(chunk_chars)
                if not more:
                    raise ValueError(f"{path}: malformed JSON ({err}); re-download the file") from err
                buffer, position = buffer[position:] + more, 0
                continue
            yield element
        raise ValueError(f"{path}: truncated JSON (no closing ']'); re-download the file")


# Arrays of one split's index: name -> dtype. Points are float64 so int truncation matches the JSON exactly.
_INDEX_ARRAYS = {
    "task_id_bytes": np.uint8,
    "task_id_offsets": np.int64,
    "phrase_bytes": np.uint8,
    "phrase_offsets": np.int64,
    "phrase_index": np.int32,
    "phrase_type": np.int8,
    "image_id": np.int64,
    "annotation_width": np.int32,
    "annotation_height": np.int32,
    "image_width": np.int32,
    "image_height": np.int32,
    "task_instances": np.int64,
    "instance_polygons": np.int64,
    "polygon_points": np.int64,
    "points": np.float64,
    "drawable": np.bool_,
    "nonfinite_polygons": np.int32,
    "zero_area_polygons": np.int32,
}


def polygon_defect(xy: Sequence[float]) -> str | None:
    """Why a polygon (flat coordinates x0, y0, x1, y1, ...) cannot be used: NON_FINITE (a NaN or infinite
    coordinate, or one beyond +-`MAX_COORDINATE` pixels), ZERO_AREA (fewer than 3 vertices, or every vertex on one
    line; a self-intersecting polygon whose signed areas cancel is drawable), or None. Plain Python: a polygon usually
    shows its third dimension at its third vertex, so this costs about 2 us, a third of numpy's fixed overhead, over
    PhraseCut's million polygons."""
    if not all(-MAX_COORDINATE <= value <= MAX_COORDINATE for value in xy):  # NaN fails the test too
        return NON_FINITE
    if len(xy) < 6:
        return ZERO_AREA
    x0, y0 = xy[0], xy[1]
    for i in range(2, len(xy) - 1, 2):  # a second vertex apart from the first gives the direction of the line
        dx, dy = xy[i] - x0, xy[i + 1] - y0
        if dx or dy:
            break
    else:
        return ZERO_AREA
    for j in range(i + 2, len(xy) - 1, 2):  # any vertex off that line (relative to the lengths involved)
        ex, ey = xy[j] - x0, xy[j + 1] - y0
        if abs(dx * ey - dy * ex) > 1e-9 * (abs(dx) + abs(dy)) * (abs(ex) + abs(ey)):
            return None
    return ZERO_AREA


def usable_polygons(instances: Sequence[Sequence]) -> tuple[list[list], dict[str, int]]:
    """Instances -> polygons -> points with the polygons `polygon_defect` refuses left out (instances kept, maybe
    empty), and how many were left out for each defect. Raises ValueError for a point that is not [x, y] numbers."""
    defects = {NON_FINITE: 0, ZERO_AREA: 0}
    kept = []
    for instance in instances:
        kept.append([])
        for polygon in instance:
            defect = polygon_defect(np.asarray(polygon, dtype=np.float64).reshape(-1, 2).ravel().tolist())
            if defect is None:
                kept[-1].append(polygon)
            else:
                defects[defect] += 1
    return kept, defects


def describe_defects(defects: dict[str, int]) -> str:
    """{"non-finite coordinates": 1, "zero area": 2} -> "1 polygon with non-finite coordinates, 2 of zero area"."""
    parts = []
    if defects.get(NON_FINITE):
        parts.append(f"{defects[NON_FINITE]} with {NON_FINITE}")
    if defects.get(ZERO_AREA):
        parts.append(f"{defects[ZERO_AREA]} of {ZERO_AREA}")
    total = sum(defects.values())
    return f"{total} polygon{'s' if total != 1 else ''} dropped: " + ", ".join(parts)


class IndexWriter:
    """Accumulates tasks into the index arrays, spilling the big ones to disk as it goes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.columns = {name: array("q") for name in ("task_id_offsets", "phrase_offsets")}
        self.columns["task_id_offsets"].append(0)
        self.columns["phrase_offsets"].append(0)
        for name in ("phrase_index", "phrase_type", "image_id", "task_instances", "instance_polygons"):
            self.columns[name] = array("q", [0] if name in ("task_instances", "instance_polygons") else [])
        self.columns["polygon_points"] = array("q", [0])
        self.columns["drawable"] = array("b")
        self.columns["nonfinite_polygons"], self.columns["zero_area_polygons"] = array("q"), array("q")
        self.task_id_bytes, self.phrase_bytes = bytearray(), bytearray()
        self.phrases: dict[str, int] = {}
        self.points = array("d")
        self.n_points = 0
        self.points_file = open(directory / "points.bin", "wb")  # noqa: SIM115 (closed in finish)

    def add(self, task: dict) -> None:
        for key, kind, name in (("task_id", str, "a string"), ("phrase", str, "a string"), ("image_id", int, "an int")):
            if type(task[key]) is not kind:
                raise TypeError(f"{key} = {printable(repr(task[key]), 40)} is not {name}")
        if not 0 <= task["image_id"] < 2**63:
            raise ValueError(f"image_id = {task['image_id']} is out of range")
        if not isinstance(task.get("phrase_structure") or {}, dict):
            raise TypeError("phrase_structure is not an object")
        encoded = task["task_id"].encode()
        self.task_id_bytes += encoded
        self.columns["task_id_offsets"].append(len(self.task_id_bytes))
        phrase = task["phrase"]
        if phrase not in self.phrases:
            self.phrases[phrase] = len(self.phrases)
            self.phrase_bytes += phrase.encode()
            self.columns["phrase_offsets"].append(len(self.phrase_bytes))
        self.columns["phrase_index"].append(self.phrases[phrase])
        structure = task.get("phrase_structure") or {}
        kind = structure.get("type")
        self.columns["phrase_type"].append(PHRASE_TYPES.index(kind) if kind in PHRASE_TYPES else -1)
        self.columns["image_id"].append(task["image_id"])
        defects, kept = {NON_FINITE: 0, ZERO_AREA: 0}, 0
        instance_polygons, polygon_points = self.columns["instance_polygons"], self.columns["polygon_points"]
        for instance in task["Polygons"]:
            for polygon in instance:
                values = array("d", itertools.chain.from_iterable(polygon))
                if len(values) != 2 * len(polygon):
                    raise ValueError("a polygon point is not an [x, y] pair")
                defect = polygon_defect(values)
                if defect is not None:
                    defects[defect] += 1
                    continue
                self.points.extend(values)
                self.n_points += len(polygon)
                polygon_points.append(self.n_points)
                kept += 1
            instance_polygons.append(len(polygon_points) - 1)
        self.columns["task_instances"].append(len(instance_polygons) - 1)
        self.columns["drawable"].append(kept > 0)
        self.columns["nonfinite_polygons"].append(defects[NON_FINITE])
        self.columns["zero_area_polygons"].append(defects[ZERO_AREA])
        if len(self.points) > 1 << 22:
            self._spill_points()

    def _spill_points(self) -> None:
        self.points_file.write(self.points.tobytes())
        self.points = array("d")

    def finish(self, image_sizes: dict[int, tuple[int, int]], actual_sizes: dict[int, tuple[int, int]]) -> dict:
        """Write all arrays; returns {name: [dtype, shape]} for the metadata."""
        self._spill_points()
        self.points_file.close()
        arrays = {
            name: np.frombuffer(values, dtype=np.int64) for name, values in self.columns.items() if name != "drawable"
        }
        arrays["drawable"] = np.frombuffer(self.columns["drawable"], dtype=np.int8).astype(bool)
        arrays["task_id_bytes"] = np.frombuffer(bytes(self.task_id_bytes), dtype=np.uint8)
        arrays["phrase_bytes"] = np.frombuffer(bytes(self.phrase_bytes), dtype=np.uint8)
        for prefix, sizes in (("annotation", image_sizes), ("image", actual_sizes)):
            width_height = np.array([sizes.get(int(i), (-1, -1)) for i in arrays["image_id"]], dtype=np.int32)
            width_height = width_height.reshape(-1, 2)
            arrays[f"{prefix}_width"], arrays[f"{prefix}_height"] = width_height[:, 0], width_height[:, 1]
        layout = {"points": ["float64", [self.n_points, 2]]}
        for name, dtype in _INDEX_ARRAYS.items():
            if name == "points":
                continue
            values = np.ascontiguousarray(arrays[name], dtype=dtype)
            values.tofile(self.directory / f"{name}.bin")
            layout[name] = [np.dtype(dtype).name, list(values.shape)]
        return layout


def _fingerprint(paths: Sequence[Path]) -> list:
    return [INDEX_VERSION] + [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in paths]


def _cache_dirs(data_dir: Path, split: str) -> list[Path]:
    """Where a split's index may live: next to the data, else a per-user cache dir keyed by the data path."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipseg" / f"phrasecut-{digest}"
    return [data_dir / ".clipseg_index" / split, user_cache / split]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe")  # noqa: SIM115
        probe.close()
        return True
    except OSError:
        return False


class TaskTable:
    """One split's tasks as memory-mapped flat arrays (fork/copy-on-write friendly: no per-task objects)."""

    def __init__(self, directory: Path, images_dir: Path):
        meta = json.loads((directory / "meta.json").read_text())
        self.directory, self.images_dir = directory, images_dir
        for name, (dtype, shape) in meta["arrays"].items():
            setattr(self, name, _map_array(directory / f"{name}.bin", np.dtype(dtype), tuple(shape)))

    def __getstate__(self) -> dict:
        # Pickled for spawn-started DataLoader workers: send the paths and re-map, never copy the arrays.
        return {"directory": self.directory, "images_dir": self.images_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["images_dir"])

    def __len__(self) -> int:
        return len(self.image_id)

    def task_id(self, row: int) -> str:
        return bytes(self.task_id_bytes[self.task_id_offsets[row] : self.task_id_offsets[row + 1]]).decode()

    def phrase(self, phrase_index: int) -> str:
        return bytes(
            self.phrase_bytes[self.phrase_offsets[phrase_index] : self.phrase_offsets[phrase_index + 1]]
        ).decode()

    def polygons(self, row: int) -> list[list[np.ndarray]]:
        """Instances -> polygons -> (N, 2) float64 points, as in the JSON's `Polygons`."""
        instances = []
        for instance in range(self.task_instances[row], self.task_instances[row + 1]):
            first, last = self.instance_polygons[instance], self.instance_polygons[instance + 1]
            instances.append(
                [np.array(self.points[self.polygon_points[p] : self.polygon_points[p + 1]]) for p in range(first, last)]
            )
        return instances

    def image_path(self, row: int) -> Path:
        return self.images_dir / f"{int(self.image_id[row])}.jpg"

    def polygon_defects(self, row: int) -> dict[str, int]:
        """How many polygons of task `row` were dropped while indexing, per defect (see `polygon_defect`)."""
        return {NON_FINITE: int(self.nonfinite_polygons[row]), ZERO_AREA: int(self.zero_area_polygons[row])}

    def dropped_polygons(self) -> list[tuple[int, int, str]]:
        """(row, count, description) for every task that lost polygons while indexing (`polygon_defect`)."""
        rows = np.flatnonzero((np.asarray(self.nonfinite_polygons) + np.asarray(self.zero_area_polygons)) > 0)
        defects = [self.polygon_defects(row) for row in rows]
        return [(int(row), sum(d.values()), describe_defects(d)) for row, d in zip(rows, defects)]

    def exclusion_reasons(self) -> list[tuple[int, str]]:
        """(row, reason) for tasks that cannot be used: annotation/image size mismatch, no usable polygon."""
        mismatch = (
            (self.image_width >= 0)
            & (self.annotation_width >= 0)
            & ((self.image_width != self.annotation_width) | (self.image_height != self.annotation_height))
        )
        reasons = []
        for row in np.flatnonzero(mismatch | ~self.drawable):
            if mismatch[row]:
                reasons.append(
                    (
                        int(row),
                        f"image {self.image_path(row).name} is {self.image_width[row]}x{self.image_height[row]} "
                        f"but annotated as {self.annotation_width[row]}x{self.annotation_height[row]}",
                    )
                )
            elif sum(self.polygon_defects(row).values()):
                reasons.append((int(row), f"no usable polygon ({describe_defects(self.polygon_defects(row))})"))
            else:
                reasons.append((int(row), "no polygon"))
        return reasons


def _map_array(path: Path, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def load_task_table(data_dir: Path, split: str, cache_dir: Path | None = None) -> TaskTable:
    """The index of `refer_<split>.json`, built on first use (streaming parse + image header checks) and
    memory-mapped afterwards. Rebuilt when the JSON files change."""
    refer = data_dir / f"refer_{split}.json"
    if not refer.is_file():
        raise FileNotFoundError(f"{refer} is missing: the PhraseCut download is incomplete. {DOWNLOAD_HINT}")
    sources = [refer, data_dir / "image_data_split.json"]
    fingerprint = _fingerprint(sources)
    candidates = [cache_dir / split] if cache_dir is not None else _cache_dirs(data_dir, split)
    for directory in candidates:
        if (table := _cached_table(directory, data_dir / "images", fingerprint)) is not None:
            return table
    for directory in candidates:
        if _writable(directory.parent):
            # The ranks of a torchrun job: one builds while the others wait, then open it (two building at once
            # removed each other's index while it was being opened).
            with exclusive_lock(directory.parent / f".{split}.lock"):
                if _cached_table(directory, data_dir / "images", fingerprint) is None:
                    _build_index(data_dir, split, directory, fingerprint)
            return TaskTable(directory, data_dir / "images")
    raise PermissionError(f"cannot write a PhraseCut index in any of {[str(d) for d in candidates]}")


def _cached_table(directory: Path, images_dir: Path, fingerprint: list) -> TaskTable | None:
    """The index in `directory` when it was built from files with `fingerprint` and opens whole; None otherwise (also
    when it was damaged, e.g. cut short or edited: it is built again)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return None
        return TaskTable(directory, images_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _build_index(data_dir: Path, split: str, directory: Path, fingerprint: list) -> None:
    refer = data_dir / f"refer_{split}.json"
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{split}-building-"))
    try:
        writer = IndexWriter(staging)
        quiet = refer.stat().st_size < 20_000_000  # progress bars only where indexing takes a while
        with tqdm(desc=f"indexing {refer.name} (once)", unit="task", mininterval=1.0, disable=quiet) as progress:
            for number, task in enumerate(iter_json_array(refer)):
                try:
                    writer.add(task)
                except (AttributeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"{refer}: task #{number} ({task.get('task_id', '?') if isinstance(task, dict) else task!r})"
                        f" is malformed ({type(err).__name__}: {err}); re-download the file"
                    ) from err
                progress.update()
        image_sizes = _annotation_sizes(data_dir / "image_data_split.json")
        image_ids = sorted(set(writer.columns["image_id"]))
        actual_sizes = {}
        for image_id in tqdm(
            image_ids, desc="checking image sizes (once)", unit="image", mininterval=1.0, disable=quiet
        ):
            size = upright_size(data_dir / "images" / f"{image_id}.jpg")
            if size is not None:
                actual_sizes[image_id] = size
        layout = writer.finish(image_sizes, actual_sizes)
        meta = {"fingerprint": fingerprint, "split": split, "arrays": layout}
        (staging / "meta.json").write_text(json_text(meta))
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.replace(staging, directory)
        except OSError:  # another process finished the same index first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _annotation_sizes(path: Path) -> dict[int, tuple[int, int]]:
    """image_data_split.json -> {image_id: (width, height)}."""
    try:
        entries = json.loads(path.read_text())
        return {int(entry["image_id"]): (int(entry["width"]), int(entry["height"])) for entry in entries}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed ({type(err).__name__}: {err}); re-download the file") from err
