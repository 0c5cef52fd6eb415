"""bench.py's scale-out rows: score.py and predict.py on 1 and 2 processes (torchrun; gloo on the CPU, NCCL on
GPUs), timed from the command's start to its end, so that start-up (imports, model loading, rendezvous) counts.

A random CLIPSeg (`backbone`: "random-vit-b16" is the released geometry, "tiny" the test model) is saved to a
temporary folder with a generated PhraseCut split (clipseg/synthetic.py) and a folder of its images; each command
then runs as a fresh process per row. Rows: {"command", "processes", "items", "unit", "seconds",
"items_per_second", "speed_up"} (speed_up: against the same command on 1 process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def scale_out_rows(
    backbone: str = "random-vit-b16",
    image_size: int = 352,
    n_images: int = 32,
    processes: Sequence[int] = (1, 2),
    device: str = "cpu",
    threads_per_process: int = 1,
) -> list[dict]:
    """Time score.py (every test task) and predict.py (every image, one prompt) on each number of `processes`."""
    import torch

    from clipseg.synthetic import make_synthetic_phrasecut
    from model import CLIPSeg

    rows = []
    with tempfile.TemporaryDirectory(prefix="clipseg-scale-out-") as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        model_dir = CLIPSeg.from_backbone(backbone, image_size=image_size).save_pretrained(scratch / "model")
        make_synthetic_phrasecut(scratch / "data", n_images=n_images, seed=0)
        images = next((scratch / "data").rglob("images"))
        common = ["--device", device, "--precision", "fp32"]
        commands = {
            "score.py": [
                "--model",
                model_dir,
                "--data",
                "synthetic",
                "--data-root",
                scratch / "data",
                "--split",
                "train",
            ]
            + ["--num-workers", "0", "--out", scratch / "scores.json", *common],
            "predict.py": [images, "--model", model_dir, "--prompt", "a shape", "--out", scratch / "pred", *common],
        }
        for command, argv in commands.items():
            for nproc in processes:
                seconds = _timed(command, argv, nproc, threads_per_process)
                items, unit = _items(command, scratch)
                row = {
                    "command": command,
                    "processes": nproc,
                    "items": items,
                    "unit": unit,
                    "seconds": round(seconds, 2),
                }
                row["items_per_second"] = round(items / seconds, 3)
                first = rows[len(rows) - processes.index(nproc)] if nproc != processes[0] else row
                row["speed_up"] = round(row["items_per_second"] / first["items_per_second"], 2)
                rows.append(row)
                print(f"{command} on {nproc} process(es): {items} {unit} in {seconds:.1f} s", file=sys.stderr)
    return rows


def _timed(command: str, argv: list, nproc: int, threads: int) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([*launcher, str(REPO / command), *map(str, argv)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command} on {nproc} processes failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def _items(command: str, scratch: Path) -> tuple[int, str]:
    if command == "score.py":
        return json.loads((scratch / "scores.json").read_text())["n_samples"], "tasks"
    return json.loads((scratch / "pred" / "summary.json").read_text())["processed"], "images"
