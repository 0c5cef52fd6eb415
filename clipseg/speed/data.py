"""The data side of speed: training-pipeline samples/s per DataLoader worker (JPEG decode, rasterising, the crop,
resize and normalisation, per resize rule), and the PhraseCut index of a large generated split, built and loaded in
fresh processes (seconds and resident memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dataset
from clipseg import synthetic
from clipseg.outputs import json_text


def data_pipeline_rate(n_samples: int = 300, image_size: int = 352) -> dict:
    """Training-pipeline samples/s in one process with one torch thread (= one DataLoader worker) on generated
    500x375 JPEGs: JPEG decode, polygon rasterisation, the original's crop, resize, normalisation, 20% negatives;
    for each resize rule, interleaved. Per wall-clock second and per CPU-second (per core, which other load on the
    machine does not distort)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="clipseg-bench-") as root:
            synthetic.make_synthetic_phrasecut(root, n_images=60, seed=0, fixed_size=(500, 375))
            data = {
                rule: dataset.PhraseCut(
                    root,
                    "train",
                    train=True,
                    image_size=image_size,
                    negative_prob=0.2,
                    resize=rule,
                    cache_dir=Path(root) / "index",
                )  # fmt: skip
                for rule in ("original", "pil")
            }
            for sampler in data.values():
                for index in range(10):
                    sampler[index % len(sampler)]
            wall = {rule: 0.0 for rule in data}
            cpu = dict(wall)
            for index in range(n_samples):
                for rule, sampler in data.items():
                    started, started_cpu = time.perf_counter(), time.process_time()
                    sampler[index % len(sampler)]
                    wall[rule] += time.perf_counter() - started
                    cpu[rule] += time.process_time() - started_cpu
    finally:
        torch.set_num_threads(threads)
    result = {
        rule: {"samples_per_s": n_samples / wall[rule], "samples_per_cpu_s": n_samples / cpu[rule]} for rule in wall
    }
    for rule, rates in result.items():
        print(
            f"data pipeline, --resize {rule}: {rates['samples_per_s']:.0f} samples/s per worker "
            f"({rates['samples_per_cpu_s']:.0f} per CPU-second), 500x375 JPEGs -> {image_size} px"
        )
    return result


_INDEX_PROBE = """
import json, sys, time, resource
import dataset
def rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
before = rss_mb()
start = time.perf_counter()
data = dataset.PhraseCut(sys.argv[1], 'train', train=True, cache_dir=sys.argv[2])
seconds = time.perf_counter() - start
data[len(data) // 2]
print(json.dumps({'seconds': seconds, 'tasks': len(data), 'rss_mb': rss_mb(), 'rss_growth_mb': rss_mb() - before,
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, allow_nan=False))
"""


def write_large_split(data_dir: Path, n_tasks: int) -> int:
    """Overwrite refer_train.json with `n_tasks` tasks cycling through the existing tasks of all splits (unique
    task ids, the same few images); streamed, so memory stays small. Returns the file size in bytes."""
    base = [task for split in dataset.SPLITS for task in json.loads((data_dir / f"refer_{split}.json").read_text())]
    path = data_dir / "refer_train.json"
    with open(path, "w", encoding="utf-8") as file:
        file.write("[")
        for number in range(n_tasks):
            task = dict(base[number % len(base)], task_id=f"{base[number % len(base)]['task_id']}_{number}")
            file.write(("," if number else "") + json_text(task))
        file.write("]")
    return path.stat().st_size


def index_rate(n_tasks: int) -> dict:
    """Build and load the PhraseCut index of an `n_tasks`-task refer_train.json, each in a fresh process:
    seconds and resident memory."""
    with tempfile.TemporaryDirectory(prefix="clipseg-index-") as root:
        data_dir = synthetic.make_synthetic_phrasecut(root, n_images=40, seed=0)
        json_bytes = write_large_split(data_dir, n_tasks)
        cache = Path(root) / "index"
        command = [sys.executable, "-c", _INDEX_PROBE, root, str(cache)]
        here = str(Path(dataset.__file__).resolve().parent)  # the repository root, for the probe's `import dataset`
        env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
        runs = {}
        for name in ("build", "cached_load"):
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            runs[name] = json.loads(output.strip().splitlines()[-1])
        index_bytes = sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())
    result = {"tasks": n_tasks, "json_mb": json_bytes / 1e6, "index_mb": index_bytes / 1e6, **runs}
    build, load = result["build"], result["cached_load"]
    print(
        f"index of {n_tasks} tasks ({result['json_mb']:.0f} MB JSON, {result['index_mb']:.0f} MB index): build "
        f"{build['seconds']:.1f} s (peak RSS {build['peak_rss_mb']:.0f} MB), cached load {load['seconds']:.2f} s "
        f"(RSS {load['rss_mb']:.0f} MB, +{load['rss_growth_mb']:.0f} MB over imports)"
    )
    return result
