"""Speed of our CLIPSeg against `transformers.CLIPSegForImageSegmentation` and against this machine's limit.

    python bench.py                      # CPU, full ViT-B/16 geometry at 352 px, writes ./bench_results.json
    python bench.py --repeats 7 --threads 2
    python bench.py --device cuda --compile
    python bench.py --rows data --index-tasks 300000   # data pipeline per worker; PhraseCut-sized index
    python bench.py --repeats 3 --rows precision   # fp32 / bf16 / int8 / ONNX / OpenVINO paths against HF fp32
    python bench.py --repeats 3 --rows runs        # checkpoint writes, K prompts per crop, grouped scoring
    python bench.py --rows forward,train --repeats 3 --clock cpu --threads 1   # forward passes, training step
    python bench.py --rows params                  # parameter counts of the full-size configurations
    python bench.py --rows scale-out               # score.py / predict.py throughput on 1 and 2 processes (torchrun)

Both models hold the same random weights (speed does not depend on their values). Variants are interleaved
(A B A B ...) after a warm-up and the median of `--repeats` runs is reported, so drift of the machine hits both
sides alike; compare ratios, not absolute times. FLOP counts are analytic (docs/original.md §9). The precision
rows end with whether predict.py's default precision on this CPU (clipseg/precision.py) is the fastest measured
path that keeps >= 99.5% of fp32's mask pixels. A run during which other processes took CPU time, or whose repeats
spread by more than 10%, ends with a warning (also under "busy" in the JSON): its absolute times are not those of a
quiet machine.

Exit status: 0 done; 2 bad flags or an --out that cannot be written; 1 a row failed (the rows measured before it
are written) or the results could not be saved; 130 interrupted (the rows measured so far are written).
"""

from __future__ import annotations

import argparse
import platform
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from clipseg.cli import NOTHING_DONE, explicit_flags, int_up_to, output_folder, positive_int, stop
from clipseg.config import RANDOM_BACKBONES, CLIPSegConfig, check_image_side, random_clip_config
from clipseg.outputs import UnwritableOutput, check_writable, write_json
from clipseg.speed.busy import busy_report, machine_state, print_warnings
from clipseg.speed.data import data_pipeline_rate, index_rate
from clipseg.speed.models import (
    bf16_comparison,
    build_models,
    forward_comparison,
    forward_flops,
    precision_paths,
    refined_head_comparison,
    training_comparison,
)
from clipseg.speed.runs import run_comparisons
from clipseg.speed.scale_out import scale_out_rows
from clipseg.speed.timing import CLOCKS, clear_repeats, matmul_rates, native_bf16, repeat_spreads, use_clock
from model import CLIPDeconv, CLIPSeg, ViTSeg, count_parameters

# This command picks the rows and writes the JSON; the measurements are clipseg/speed/ (timing, models, runs, data).
RESULTS_NAME = "bench_results.json"
MAX_THREADS = 1024  # torch's thread pool for 100,000 threads ran out of memory
ROWS = {  # the groups of rows --rows picks, in the order they are measured
    "params": "the parameter counts of the full-size configurations (random weights, no download)",
    "scale-out": "score.py and predict.py throughput on 1 and 2 processes under torchrun (README 'Scale out')",
    "head": "the refined head against the same layers run one by one",
    "runs": "checkpoint save (complete vs decoder-only), training samples/s with --prompts-per-image 4 vs 1, score.py "
    "encoding each image once vs once per task",
    "precision": "the CPU precision paths (fp32, bf16, int8, ONNX, OpenVINO) against HF fp32, with their mask "
    "agreement and whether predict.py's default is the fastest that keeps the masks; the ONNX and OpenVINO rows "
    "export the model to a temporary folder (minutes at B/16) and are skipped with a message without their "
    "requirements file",
    "forward": "the fp32 forward against HF's (one prompt per image, one image with ten prompts) and bf16",
    "train": "a training step against HF's",
    "data": "the data pipeline per worker (and, with --index-tasks, a PhraseCut-sized index)",
}
DEFAULT_ROWS = ("head", "runs", "precision", "forward", "train", "data")
OLDER_ROW_FLAGS = {  # the older spellings of --rows: a flag -> the groups it keeps (only) or drops (skip)
    "--only-params": ("only", "params"),
    "--only-scale-out": ("only", "scale-out"),
    "--only-head": ("only", "head"),
    "--only-runs": ("only", "runs"),
    "--only-precision": ("only", "precision"),
    "--only-data": ("only", "data"),
    "--skip-runs": ("skip", "runs"),
    "--skip-precision": ("skip", "precision"),
    "--skip-train": ("skip", "train"),
    "--skip-data": ("skip", "data"),
}
CPU_FEATURES = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="row groups (--rows):\n" + "\n".join(wrap_row_group(name, text) for name, text in ROWS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per variant (median reported)")
    parser.add_argument(
        "--threads", type=int_up_to(MAX_THREADS), default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--image-size",
        type=patch_multiple,
        default=352,
        help="input side, a multiple of the patch size 16 (default 352)",
    )
    parser.add_argument("--refined", action="store_true", help="benchmark the refined head")
    parser.add_argument("--compile", action="store_true", help="also torch.compile our model (GPU runs)")
    parser.add_argument(
        "--rows",
        type=row_groups,
        default=DEFAULT_ROWS,
        metavar="GROUP,...",
        help=f"the groups of rows to measure, comma-separated (default: {','.join(DEFAULT_ROWS)}; the groups are listed"
        " below). The older flags --only-X (--rows X) and --skip-X (the default without X) still work",
    )
    parser.add_argument(
        "--scale-out-backbone",
        default="random-vit-b16",
        choices=("tiny", *RANDOM_BACKBONES),
        help="model of the scale-out rows, random weights: random-vit-b16 (the released geometry, default), another "
        "CLIP geometry or tiny",
    )
    parser.add_argument(
        "--index-tasks",
        type=int,
        default=0,
        help="also build and load the PhraseCut index of a generated split of N tasks (300000 is PhraseCut's size)",
    )
    for flag in OLDER_ROW_FLAGS:
        parser.add_argument(flag, action="append_const", const=flag, dest="older_row_flags", help=argparse.SUPPRESS)
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, for a machine busy with other work (with "
        "--threads 1 it counts the work done, not the time spent waiting for a core)",
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        default=".",
        metavar="DIR",
        help=f"folder of the JSON results, OUT/{RESULTS_NAME} (default: .)",
    )
    args = parser.parse_args(argv)
    try:
        args.rows = chosen_rows(args.rows, args.older_row_flags or [], "rows" in explicit_flags(parser, argv))
    except ValueError as err:
        parser.error(str(err))
    if args.index_tasks and "data" not in args.rows:
        parser.error("--index-tasks measures with the data rows: add data to --rows")
    out = Path(args.out) / RESULTS_NAME
    try:
        check_writable(out)
    except UnwritableOutput as err:
        parser.error(str(err))
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {
            "cpu": cpu_description(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "image_size": args.image_size,
        "repeats": args.repeats,
        "clock": args.clock,
    }
    machine = results["machine"]
    print(f"{machine['cpu']}, {machine['cpu_threads']} threads; torch {machine['torch']}; device {machine['device']}")
    clear_repeats()
    start = machine_state()
    try:
        measure(args, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("interrupted: writing the rows measured so far", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 (any failure of a row: the rows measured before it are kept)
        results["failed"] = f"{type(err).__name__}: {err}"
        print(f"error: a row failed ({results['failed']}): writing the rows measured so far", file=sys.stderr)
    results["busy"] = busy_report(start, machine_state(), torch.get_num_threads(), repeat_spreads())
    print_warnings(results["busy"])
    try:
        write_json(out, results)
    except (OSError, ValueError) as err:
        stop(f"the results above were not saved: {err}", NOTHING_DONE)
    print(f"wrote {out}")
    if "failed" in results:
        raise SystemExit(NOTHING_DONE)
    return results


def patch_multiple(text: str) -> int:
    """--image-size: a side the ViT-B/16 geometry runs at (a multiple of 16 up to MAX_IMAGE_SIDE)."""
    side = int(text)
    try:
        return check_image_side(side, 16, "ViT-B/16")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removesuffix(" (--image-size)")) from err


def wrap_row_group(name: str, text: str) -> str:
    """One entry of --help's list of row groups: the name, then its text wrapped under it."""
    return textwrap.fill(text, width=100, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)


def row_groups(text: str) -> tuple[str, ...]:
    """--rows: comma-separated names of ROWS, each once, in the order they are measured."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'no group'}: choose from {', '.join(ROWS)}")
    return tuple(name for name in ROWS if name in names)


def chosen_rows(rows: tuple[str, ...], older: list[str], rows_given: bool) -> tuple[str, ...]:
    """The groups to measure from --rows and its older spellings (`older`, in the order given): the --only-X flags
    together keep the groups they name, the --skip-X flags drop theirs. ValueError when --rows is given as well."""
    if not older:
        return rows
    if rows_given:
        raise ValueError(f"give the rows either with --rows or with {older[0]}, not both")
    kept = {OLDER_ROW_FLAGS[flag][1] for flag in older if OLDER_ROW_FLAGS[flag][0] == "only"}
    dropped = {OLDER_ROW_FLAGS[flag][1] for flag in older if OLDER_ROW_FLAGS[flag][0] == "skip"}
    rows = tuple(name for name in ROWS if name in (kept or set(DEFAULT_ROWS)) and name not in dropped)
    if not rows:
        raise ValueError(f"{' '.join(older)} leave no row to measure")
    return rows


def cpu_description() -> str:
    """The CPU's name and the vector and matrix extensions the timings depend on (torch's own detection)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    name = capabilities.get("cpu_name") or platform.processor() or platform.machine()
    features = [feature for feature in CPU_FEATURES if capabilities.get(feature)]
    return f"{name} ({', '.join(features) or 'none of ' + ', '.join(CPU_FEATURES)})"


def measure(args: argparse.Namespace, results: dict) -> None:
    """Fills `results` with the groups of rows in `args.rows` (main writes it, also after Ctrl-C)."""
    device, size, repeats, rows = args.device, args.image_size, args.repeats, args.rows
    if "params" in rows:
        results["parameters"] = parameter_counts()
    if "scale-out" in rows:
        threads = args.threads or 1
        results["scale_out"] = scale_out_rows(args.scale_out_backbone, size, device=device, threads_per_process=threads)
    if "head" in rows:
        results["refined_head"] = refined_head_comparison(device, size, repeats)
    if {"runs", "precision", "forward", "train"} & set(rows):
        measure_models(args, results)
    if "data" in rows:
        results["data_pipeline"] = data_pipeline_rate(image_size=size)
        if args.index_tasks:
            results["index"] = index_rate(args.index_tasks)


def measure_models(args: argparse.Namespace, results: dict) -> None:
    """The rows that time our model against HF's: runs, precision, forward (with bf16) and train."""
    device, size, repeats, rows = args.device, args.image_size, args.repeats, args.rows
    native = native_bf16(device)
    results["native_bf16"] = native
    ours, hf = build_models(device, args.refined)
    if args.compile:
        ours.decoder.compile()
    if "runs" in rows:
        results["runs"] = run_comparisons(ours, device, size, repeats)
    if not {"precision", "forward", "train"} & set(rows):
        return
    int8 = device == "cpu" and "precision" in rows
    results["matmul_gflops"] = rates = matmul_rates(device, repeats, int8=int8)
    flops_ours = forward_flops(ours, size)
    if "precision" in rows:
        results["precision_paths"] = precision_paths(ours, hf, device, size, repeats, flops_ours, rates)
    if "forward" in rows:
        forward = forward_comparison(ours, hf, device, size, repeats)
        batch, side = (8, 2048) if native else (1, None)
        results["bf16"] = bf16_comparison(ours, hf, device, size, repeats, forward, flops_ours, batch, side)
        results["rows"] = forward
        results["fraction_of_fp32_matmul"] = forward[0]["ours_gflops"] / rates["fp32"]
        print(f"fp32 forward (batch 1) at {100 * results['fraction_of_fp32_matmul']:.0f}% of the fp32 matmul rate")
    if "train" in rows:
        results["training"] = training_comparison(ours, hf, device, size, repeats, bf16=native)


def full_size_models() -> Iterator[tuple[str, str, CLIPSeg]]:
    """(name, the trainable parameters the paper's code gives or None, model) for each full-size configuration, with
    random weights (docs/original.md §2.7 and §10)."""
    b16 = random_clip_config("random-vit-b16")
    yield "CLIPSeg ViT-B/16, D=64", "1,073,153", CLIPSeg(CLIPSegConfig(clip=b16))
    yield "CLIPSeg ViT-B/16, D=64, refined", "1,127,009", CLIPSeg(CLIPSegConfig(clip=b16, refined=True))
    yield "CLIPSeg ViT-B/32, D=64", "-", CLIPSeg(CLIPSegConfig(clip=random_clip_config("random-vit-b32")))
    yield "CLIPSeg ViT-L/14, D=64", "-", CLIPSeg(CLIPSegConfig(clip=random_clip_config("random-vit-l14")))
    yield "CLIP-Deconv ViT-B/16, D=64", "about 139.6k", CLIPDeconv(CLIPSegConfig(arch="clip-deconv", clip=b16))
    vit = transformers.ViTConfig(image_size=384)  # google/vit-base-patch16-384's geometry
    yield "ViTSeg ViT-B/16-384, D=64", "-", ViTSeg(CLIPSegConfig(arch="vitseg", clip=b16, vit=vit))


def parameter_counts() -> list[dict]:
    """Total and trainable parameters of `full_size_models()`, printed as a markdown table."""
    torch.manual_seed(0)
    rows = []
    print(
        "| configuration | total | trainable | trainable share | the original's |\n| --- | ---: | ---: | ---: | --- |"
    )
    for name, original, model in full_size_models():
        total, trainable = count_parameters(model, trainable_only=False), count_parameters(model)
        rows.append({"configuration": name, "total": total, "trainable": trainable, "original": original})
        print(f"| {name} | {total:,} | {trainable:,} | {100 * trainable / total:.2f}% | {original} |")
        del model
    return rows


if __name__ == "__main__":
    sys.exit(130 if main().get("interrupted") else 0)
