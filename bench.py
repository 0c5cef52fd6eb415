"""Speed of our CLIPSeg against `transformers.CLIPSegForImageSegmentation` and against this machine's limit.

    python bench.py                      # CPU, full ViT-B/16 geometry at 352 px, writes ./bench_results.json
    python bench.py --repeats 7 --threads 2
    python bench.py --device cuda --compile
    python bench.py --only-data --index-tasks 300000   # data pipeline per worker; PhraseCut-sized index
    python bench.py --repeats 3 --only-precision   # fp32 / bf16 / int8 / ONNX paths against HF fp32 only
    python bench.py --repeats 3 --only-runs        # checkpoint writes, K prompts per crop, grouped scoring
    python bench.py --only-params                  # parameter counts of the full-size configurations
    python bench.py --only-scale-out               # score.py / predict.py throughput on 1 and 2 processes (torchrun)

Both models hold the same random weights (speed does not depend on their values). Variants are interleaved
(A B A B ...) after a warm-up and the median of `--repeats` runs is reported, so drift of the machine hits both
sides alike; compare ratios, not absolute times. FLOP counts are analytic (docs/original.md §9). The precision
rows end with whether predict.py's default precision on this CPU (clipseg/precision.py) is the fastest measured
path that keeps >= 99.5% of fp32's mask pixels. A run during which other processes took CPU time, or whose repeats
spread by more than 10%, ends with a warning (also under "busy" in the JSON): its absolute times are not those of a
quiet machine.

Exit status: 0 done; 2 bad flags or an --out that cannot be written; 1 the results could not be saved; 130
interrupted (the rows measured so far are written).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from clipseg.cli import NOTHING_DONE, output_folder, stop
from clipseg.config import CLIPSegConfig, random_clip_config
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
CPU_FEATURES = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--image-size", type=int, default=352)
    parser.add_argument("--refined", action="store_true", help="benchmark the refined head")
    parser.add_argument("--compile", action="store_true", help="also torch.compile our model (GPU runs)")
    parser.add_argument("--skip-train", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--skip-data", action="store_true", help="skip the data pipeline measurement")
    parser.add_argument("--only-head", action="store_true", help="only the refined-head comparison")
    parser.add_argument("--only-data", action="store_true", help="only the data pipeline (and --index-tasks) rows")
    parser.add_argument(
        "--only-scale-out",
        action="store_true",
        help="only score.py and predict.py throughput on 1 and 2 processes under torchrun (README 'Scale out')",
    )
    parser.add_argument(
        "--scale-out-backbone",
        default="random-vit-b16",
        help="model of the scale-out rows: random-vit-b16 (the released geometry, default) or tiny",
    )
    parser.add_argument(
        "--only-params",
        action="store_true",
        help="only the parameter counts of the full-size configurations (random weights, no download)",
    )
    parser.add_argument(
        "--index-tasks",
        type=int,
        default=0,
        help="also build and load the PhraseCut index of a generated split of N tasks (300000 is PhraseCut's size)",
    )
    parser.add_argument(
        "--only-precision",
        action="store_true",
        help="only the CPU precision paths (fp32, bf16, int8, ONNX) against HF fp32; the ONNX row exports the model "
        "to a temporary folder (minutes at B/16) and is skipped with a message without requirements-export.txt",
    )
    parser.add_argument("--skip-precision", action="store_true", help="skip the precision paths")
    parser.add_argument(
        "--only-runs",
        action="store_true",
        help="only the training-run and scoring rows: checkpoint save (complete vs decoder-only), training samples/s "
        "with --prompts-per-image 4 vs 1, score.py encoding each image once vs once per task",
    )
    parser.add_argument("--skip-runs", action="store_true", help="skip the training-run and scoring rows")
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
    results["busy"] = busy_report(start, machine_state(), torch.get_num_threads(), repeat_spreads())
    print_warnings(results["busy"])
    try:
        write_json(out, results)
    except (OSError, ValueError) as err:
        stop(f"the results above were not saved: {err}", NOTHING_DONE)
    print(f"wrote {out}")
    return results


def cpu_description() -> str:
    """The CPU's name and the vector and matrix extensions the timings depend on (torch's own detection)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    name = capabilities.get("cpu_name") or platform.processor() or platform.machine()
    features = [feature for feature in CPU_FEATURES if capabilities.get(feature)]
    return f"{name} ({', '.join(features) or 'none of ' + ', '.join(CPU_FEATURES)})"


def measure(args: argparse.Namespace, results: dict) -> None:
    """Fills `results` row by row (main writes it, also after Ctrl-C)."""
    device, size, repeats = args.device, args.image_size, args.repeats
    if args.only_params:
        results["parameters"] = parameter_counts()
        return
    if args.only_scale_out:
        threads = args.threads or 1
        results["scale_out"] = scale_out_rows(args.scale_out_backbone, size, device=device, threads_per_process=threads)
        return
    if args.only_data:
        results["data_pipeline"] = data_pipeline_rate(image_size=size)
        if args.index_tasks:
            results["index"] = index_rate(args.index_tasks)
        return
    if not (args.only_precision or args.only_runs):
        results["refined_head"] = refined_head_comparison(device, size, repeats)
    if args.only_head:
        return
    if args.only_runs:
        ours, _ = build_models(device, args.refined)
        results["runs"] = run_comparisons(ours, device, size, repeats)
        return
    native = native_bf16(device)
    results["native_bf16"] = native
    results["matmul_gflops"] = rates = matmul_rates(device, repeats, int8=device == "cpu" and not args.skip_precision)

    ours, hf = build_models(device, args.refined)
    if args.compile:
        ours.decoder.compile()
    if not (args.skip_runs or args.only_precision):
        results["runs"] = run_comparisons(ours, device, size, repeats)
    flops_ours = forward_flops(ours, size)
    if not args.skip_precision:
        results["precision_paths"] = precision_paths(ours, hf, device, size, repeats, flops_ours, rates)
    if args.only_precision:
        return
    rows = forward_comparison(ours, hf, device, size, repeats)
    results["bf16"] = bf16_comparison(
        ours,
        hf,
        device,
        size,
        repeats,
        rows,
        flops_ours,
        batch=8 if native else 1,
        matmul_side=2048 if native else None,
    )
    results["rows"] = rows
    results["fraction_of_fp32_matmul"] = rows[0]["ours_gflops"] / results["matmul_gflops"]["fp32"]
    print(f"fp32 forward (batch 1) at {100 * results['fraction_of_fp32_matmul']:.0f}% of the fp32 matmul rate")

    if not args.skip_train:
        results["training"] = training_comparison(ours, hf, device, size, repeats, bf16=native)
    if not args.skip_data:
        results["data_pipeline"] = data_pipeline_rate(image_size=size)
    if args.index_tasks:
        results["index"] = index_rate(args.index_tasks)


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
