"""Speed of our CLIPSeg against `transformers.CLIPSegForImageSegmentation` and against this machine's limit.

    python bench.py                      # CPU, full ViT-B/16 geometry at 352 px, writes bench_results.json
    python bench.py --repeats 7 --threads 2
    python bench.py --device cuda --compile
    python bench.py --only-data --index-tasks 300000   # data pipeline per worker; PhraseCut-sized index
    python bench.py --repeats 3 --only-precision   # fp32 / bf16 / int8 / ONNX paths against HF fp32 only
    python bench.py --repeats 3 --only-runs        # checkpoint writes, K prompts per crop, grouped scoring
    python bench.py --only-params                  # parameter counts of the full-size configurations

Both models hold the same random weights (speed does not depend on their values). Variants are interleaved
(A B A B ...) after a warm-up and the median of `--repeats` runs is reported, so drift of the machine hits both
sides alike; compare ratios, not absolute times. FLOP counts are analytic (docs/original.md §9).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from clipseg import runs
from clipseg.cli import NOTHING_DONE, stop
from clipseg.config import DEFAULT_BACKBONE, CLIPSegConfig, random_clip_config
from clipseg.decoder import RefinedHead
from clipseg.outputs import UnwritableOutput, check_writable, json_text, write_json
from clipseg.precision import amp_dtype, precision_context, prepare_model, quantize_linears
from model import CLIPDeconv, CLIPSeg, ViTSeg, count_parameters

CPU_FEATURES = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
PHRASES = [
    "a red car on the left",
    "the cat",
    "a person riding a bike",
    "green tree",
    "the sky",
    "white building behind the fence",
    "dog",
    "a wooden table",
    "the road",
    "two people walking",
]


def vit_flops(tokens: int, blocks: int, width: int = 768, mlp: int = 3072) -> float:
    """Multiply-adds x 2 of `blocks` ViT blocks over `tokens` tokens (projections, attention, MLP)."""
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    return blocks * per_block


def decoder_flops(tokens: int, dim: int = 64, ffn: int = 2048, width: int = 768, layers: int = 3) -> float:
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * ffn) + 4 * tokens * tokens * dim
    return layers * (per_layer + 2 * tokens * width * dim) + 2 * (tokens - 1) * dim * 256


def text_flops(tokens: int, blocks: int = 12, width: int = 512) -> float:
    return vit_flops(tokens, blocks, width, 4 * width)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # `--clock cpu` switches every measurement to the process's CPU time


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant (by `clock`), measured A B A B ... after `warmup` rounds."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_rate(dtype: torch.dtype, device: str, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` (median of `repeats`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = interleaved({"mm": lambda: _sync(device, a @ b)}, repeats, warmup=2)["mm"]
    return 2 * n**3 / seconds / 1e9


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively on `device`; where it does not (AVX2 CPUs), PyTorch emulates it at a small
    fraction of the fp32 rate, so the bf16 cases shrink to stay affordable (and `--amp` stays in fp32)."""
    return amp_dtype(device) == torch.bfloat16


def _sync(device: str, value=None):
    if device == "cuda":
        torch.cuda.synchronize()
    return value


def build_models(device: str, refined: bool) -> tuple[CLIPSeg, transformers.CLIPSegForImageSegmentation]:
    """The full ViT-B/16 CLIPSeg geometry with random weights, in both implementations."""
    clip = transformers.CLIPConfig(
        text_config={}, vision_config=dict(patch_size=16, image_size=224), projection_dim=512
    )
    config = CLIPSegConfig(refined=refined, clip=clip)
    torch.manual_seed(0)
    hf = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig.from_dict(config.to_hf_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = CLIPSeg.from_pretrained(tmp)
    return ours.to(device).eval(), hf.to(device).eval()


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
    parser.add_argument("--out", default="bench_results.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    try:
        check_writable(args.out)
    except UnwritableOutput as err:
        parser.error(str(err))
    global clock
    clock = CLOCKS[args.clock]
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
    try:
        measure(args, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("interrupted: writing the rows measured so far", file=sys.stderr)
    try:
        write_json(args.out, results)
    except (OSError, ValueError) as err:
        stop(f"the results above were not saved: {err}", NOTHING_DONE)
    print(f"wrote {args.out}")
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
    bf16_side = 2048 if native else 512  # emulated bf16: a 2048^3 matmul takes about a minute
    results["native_bf16"] = native
    results["matmul_gflops"] = {
        "fp32": matmul_rate(torch.float32, device, repeats),
        "bf16": matmul_rate(torch.bfloat16, device, repeats, n=bf16_side),
        "bf16_side": bf16_side,
    }
    if device == "cpu" and not args.skip_precision:
        results["matmul_gflops"]["int8"] = int8_linear_rate(repeats)
    rates = results["matmul_gflops"]
    print(
        f"matmul: fp32 {rates['fp32']:.1f} GFLOP/s (2048^3), bf16 {rates['bf16']:.1f} GFLOP/s ({bf16_side}^3)"
        + (f", int8 dynamic-quantised linear {rates['int8']:.1f} GOP/s (2048^3)" if "int8" in rates else "")
        + ("" if native else "; no native bf16 on this device: bf16 is emulated")
    )

    ours, hf = build_models(device, args.refined)
    if args.compile:
        ours.decoder.compile()
    if not (args.skip_runs or args.only_precision):
        results["runs"] = run_comparisons(ours, device, size, repeats)
    tokens = (size // 16) ** 2 + 1
    deepest = max(ours.config.extract_layers) + 1
    text_tokens = max(len(ours.tokenize([p])[0][0]) for p in PHRASES)
    flops_ours = vit_flops(tokens, deepest) + text_flops(text_tokens) + decoder_flops(tokens)
    if not args.skip_precision:
        results["precision_paths"] = precision_paths(ours, hf, device, size, repeats, flops_ours, rates)
    if args.only_precision:
        return
    rows = []

    def compare(name: str, batch: int, prompts: int, run_ours, run_hf, flops: float) -> None:
        timing = interleaved({"ours": run_ours, "hf": run_hf}, repeats)
        row = {
            "case": name,
            "batch": batch,
            "prompts": prompts,
            "ours_s": timing["ours"],
            "hf_s": timing["hf"],
            "ours_over_hf": timing["ours"] / timing["hf"],
            "speedup": timing["hf"] / timing["ours"],
            "ours_gflops": flops / timing["ours"] / 1e9,
        }
        rows.append(row)
        print(
            f"{name:38s} ours {timing['ours'] * 1e3:8.0f} ms  HF {timing['hf'] * 1e3:8.0f} ms  "
            f"ours/HF {row['ours_over_hf']:.2f}  ({row['ours_gflops']:.0f} GFLOP/s)"
        )

    for batch in (1, 8):
        pixels = torch.randn(batch, 3, size, size, device=device)
        phrases = (PHRASES * batch)[:batch]
        ids, mask = ours.tokenize(phrases)
        ids, mask = ids.to(device), mask.to(device)

        def run_ours(pixels=pixels, phrases=phrases):
            with torch.inference_mode():
                return _sync(device, ours(pixels, phrases).logits)

        def run_hf(pixels=pixels, ids=ids, mask=mask):
            with torch.inference_mode():
                return _sync(device, hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits)

        compare(f"1 prompt per image, batch {batch}, fp32", batch, batch, run_ours, run_hf, batch * flops_ours)

    one = torch.randn(1, 3, size, size, device=device)
    ids, mask = ours.tokenize(PHRASES)
    ids, mask = ids.to(device), mask.to(device)

    def ours_many():
        with torch.inference_mode():
            return _sync(device, ours.predict_prompts(one, phrases=PHRASES))

    def hf_many():
        with torch.inference_mode():
            return _sync(device, hf(pixel_values=one.expand(10, -1, -1, -1), input_ids=ids, attention_mask=mask).logits)

    many_flops = vit_flops(tokens, deepest) + 10 * (text_flops(text_tokens) + decoder_flops(tokens))
    compare("1 image, 10 prompts, fp32", 1, 10, ours_many, hf_many, many_flops)

    results["bf16"] = bf16_comparison(ours, hf, device, size, repeats, rows, flops_ours, batch=8 if native else 1)
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


def run_comparisons(ours: CLIPSeg, device: str, size: int, repeats: int) -> dict:
    """The rows of a training run and of scoring, at the full geometry."""
    return {
        "checkpoint": checkpoint_comparison(ours, repeats),
        "prompts_per_image": prompts_per_image_comparison(ours, device, size, repeats),
        "grouped_scoring": scoring_comparison(ours, device, size, max(1, repeats // 2)),
    }


def checkpoint_comparison(ours: CLIPSeg, repeats: int) -> dict:
    """A checkpoint at the full ViT-B/16 geometry, interleaved: the complete model (what every checkpoint wrote
    before) against the decoder-only one train.py now writes while it trains, each with the training state
    (decoder + AdamW moments). Seconds and bytes on this machine's disk."""
    model = copy.deepcopy(ours).cpu()
    model.config.clip_source = DEFAULT_BACKBONE  # a reference only: nothing is loaded from it here
    optimizer = torch.optim.AdamW(model.decoder.parameters())
    for parameter in model.decoder.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # AdamW's moments exist, as in a real training state
    state = {"decoder": model.decoder.state_dict(), "optimizer": optimizer.state_dict()}
    with tempfile.TemporaryDirectory(prefix="clipseg-ckpt-") as root:
        files = {name: runs.RunFiles(Path(root) / name) for name in ("complete", "decoder_only")}

        def save(name: str) -> None:
            files[name].dir.mkdir(exist_ok=True)
            runs.save_model(model, files[name].dir, complete=name == "complete")
            runs.save_state(files[name], state)

        timing = interleaved({name: lambda name=name: save(name) for name in files}, repeats)
        sizes = {name: sum(p.stat().st_size for p in f.dir.iterdir()) for name, f in files.items()}
    out = {name: {"seconds": timing[name], "bytes": sizes[name]} for name in files}
    out["speedup"] = timing["complete"] / timing["decoder_only"]
    print(
        f"checkpoint at ViT-B/16 (model + training state): complete {timing['complete']:.2f} s, "
        f"{sizes['complete'] / 1e6:.0f} MB; decoder-only {timing['decoder_only'] * 1e3:.0f} ms, "
        f"{sizes['decoder_only'] / 1e6:.1f} MB ({out['speedup']:.0f}x faster)"
    )
    return out


def prompts_per_image_comparison(ours: CLIPSeg, device: str, size: int, repeats: int, batch: int = 8) -> dict:
    """Training samples/s (forward with labels, backward, AdamW step; fp32; the data pipeline left out) with one
    prompt per image crop, the recipe, against train.py --prompts-per-image 4: the same 8 samples on a quarter of
    the crops, so the frozen vision tower runs a quarter as often."""
    model = copy.deepcopy(ours).train()
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=1e-4)
    conditional = torch.randn(batch, model.config.clip.projection_dim, device=device)
    labels = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    crops = {k: torch.randn(batch // k, 3, size, size, device=device) for k in (1, 4)}

    def step(k: int) -> None:
        loss = model(crops[k], conditional=conditional, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)

    timing = interleaved({f"k{k}": lambda k=k: step(k) for k in crops}, repeats)
    rates = {name: batch / seconds for name, seconds in timing.items()}
    out = {"batch": batch, "samples_per_s": rates, "speedup": rates["k4"] / rates["k1"]}
    print(
        f"training step, {batch} samples: 1 prompt per crop {rates['k1']:.2f} samples/s, 4 prompts per crop "
        f"{rates['k4']:.2f} samples/s ({out['speedup']:.2f}x)"
    )
    return out


def scoring_comparison(ours: CLIPSeg, device: str, size: int, repeats: int, images: int = 10) -> dict:
    """score.py on a generated PhraseCut-format split whose images have 5 or more tasks each (PhraseCut's test
    split has 5.6), fp32: each image read and encoded once for all its tasks, as score.py does, against once per
    task, as the reference implementations do. Same metrics either way (tests/test_inference.py)."""
    import dataset
    import score
    from clipseg import synthetic

    model = copy.deepcopy(ours).eval()
    model.text_cache = {}
    with tempfile.TemporaryDirectory(prefix="clipseg-score-") as root:
        data_dir = synthetic.make_synthetic_phrasecut(root, n_images=12 * images, seed=1, fixed_size=(500, 375))
        tasks = [t for split in dataset.SPLITS for t in json.loads((data_dir / f"refer_{split}.json").read_text())]
        per_image = Counter(t["image_id"] for t in tasks)
        chosen = sorted(i for i, n in per_image.items() if n >= 5)[:images]
        kept = [t for t in tasks if t["image_id"] in chosen]
        (data_dir / "refer_test.json").write_text(json_text(kept))
        data = dataset.PhraseCut(root, "test", train=False, image_size=size, cache_dir=Path(root) / "index")
        variants = {
            "grouped": lambda: score.score(model, data, batch_size=16),
            "per_task": lambda: score.score(model, data, batch_size=16, group_by_image=False),
        }
        timing = interleaved(variants, repeats, warmup=0)
    out = {
        "images": len(chosen),
        "tasks": len(kept),
        "tasks_per_image": len(kept) / len(chosen),
        "seconds": timing,
        "speedup": timing["per_task"] / timing["grouped"],
    }
    print(
        f"scoring {len(kept)} tasks on {len(chosen)} images ({out['tasks_per_image']:.1f} per image): each image "
        f"once {timing['grouped']:.1f} s, once per task {timing['per_task']:.1f} s ({out['speedup']:.2f}x)"
    )
    return out


def refined_head_comparison(device: str, size: int, repeats: int, batch: int = 32) -> dict:
    """Our refined head (transposed convolutions as matrix products) against the same weights run layer by layer
    through nn.Conv2d / nn.ConvTranspose2d, on a (batch, 64, size/16, size/16) input: inference and training."""
    head = RefinedHead(64).to(device)
    grid = torch.randn(batch, 64, size // 16, size // 16, device=device, requires_grad=True)
    upstream = torch.randn(batch, 1, size, size, device=device)

    def infer(forward):
        with torch.inference_mode():
            return _sync(device, forward(head, grid))

    def train(forward):
        forward(head, grid).backward(upstream)
        return _sync(device, grid.grad)

    result = {"batch": batch, "size": size}
    for mode, run in (("inference", infer), ("training", train)):
        timing = interleaved(
            {"ours": lambda r=run: r(RefinedHead.forward), "layers": lambda r=run: r(nn.Sequential.forward)}, repeats
        )
        result[mode] = {
            "ours_s": timing["ours"],
            "layers_s": timing["layers"],
            "speedup": timing["layers"] / timing["ours"],
        }
        print(
            f"refined head, batch {batch} at {size} px, {mode:9s}: ours {timing['ours'] * 1e3:6.1f} ms, "
            f"layer by layer {timing['layers'] * 1e3:6.1f} ms, speedup {result[mode]['speedup']:.2f}x"
        )
    return result


def bf16_comparison(ours, hf, device, size, repeats, rows, flops, batch: int) -> dict:
    """Our bf16-autocast forward vs HF fp32, and how many mask pixels (p > 0.5) agree with our fp32 masks."""
    pixels = torch.randn(batch, 3, size, size, device=device)
    phrases = PHRASES[:batch]
    ids, mask = ours.tokenize(phrases)

    def ours_bf16():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            return _sync(device, ours(pixels, phrases).logits)

    def hf_fp32():
        with torch.inference_mode():
            return _sync(
                device, hf(pixel_values=pixels, input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            )

    timing = interleaved({"ours_bf16": ours_bf16, "hf_fp32": hf_fp32}, repeats)
    with torch.inference_mode():
        fp32_masks = ours(pixels, phrases).logits > 0
    agreement = ((ours_bf16().float() > 0) == fp32_masks).float().mean().item()
    speedup = timing["hf_fp32"] / timing["ours_bf16"]
    rows.append(
        {
            "case": f"bf16 ours vs fp32 HF, batch {batch}",
            "batch": batch,
            "prompts": batch,
            "ours_s": timing["ours_bf16"],
            "hf_s": timing["hf_fp32"],
            "ours_over_hf": 1 / speedup,
            "speedup": speedup,
            "ours_gflops": batch * flops / timing["ours_bf16"] / 1e9,
        }
    )
    print(f"bf16 ours vs fp32 HF, batch {batch}: {speedup:.2f}x faster, mask agreement {100 * agreement:.2f}%")
    return {"batch": batch, "speedup_vs_hf_fp32": speedup, "mask_agreement": agreement}


LOGIT_AT_THRESHOLD = math.log(0.3 / 0.7)  # probability > 0.3, the paper's threshold


def precision_paths(ours, hf, device, size, repeats, flops, rates) -> dict:
    """Our fp32, bf16, int8 and ONNX paths against the HF class in fp32, interleaved in one run, at batch 1 and 8
    with one prompt per image (text encoded in each call, as HF does): median latency, speed-up over HF fp32, mask
    agreement (probability > 0.3) with our fp32, GFLOP/s, and that rate as a fraction of the machine's fp32
    matmul rate and of the path's own dtype's rate."""
    if device != "cpu":
        print("precision paths: skipped, they are CPU paths (int8, onnxruntime)")
        return {"skipped": "not a CPU run"}
    models = {"ours_fp32": (ours, "fp32")}
    if native_bf16(device):
        models["ours_bf16"] = (ours, "bf16")
    else:
        print("precision paths: no native bf16 on this CPU, so --precision bf16 runs fp32: no bf16 row")
    models["ours_int8"] = (prepare_model(copy.deepcopy(ours), "int8", device), "int8")
    own_rate = {"fp32": rates["fp32"], "bf16": rates["bf16"] if rates["bf16_side"] == 2048 else None}
    own_rate["int8"] = rates.get("int8")
    with tempfile.TemporaryDirectory() as tmp:
        runner = onnx_runner(ours, Path(tmp))
        out = {}
        for batch in (1, 8):
            out[f"batch_{batch}"] = time_precision_paths(ours, hf, models, runner, batch, size, repeats)
            print(f"precision paths, batch {batch}, 1 prompt per image, {size} px:")
            for name, row in out[f"batch_{batch}"].items():
                precision = "fp32" if name in ("hf_fp32", "onnx_fp32") else models[name][1]
                row["gflops"] = batch * flops / row["seconds"] / 1e9
                row["of_fp32_matmul"] = row["gflops"] / rates["fp32"]
                row["of_own_matmul"] = row["gflops"] / own_rate[precision] if own_rate[precision] else None
                own = f"{100 * row['of_own_matmul']:4.0f}%" if row["of_own_matmul"] else "   -"
                print(
                    f"  {name:10s} {row['seconds'] * 1e3:7.0f} ms  {row['speedup_vs_hf_fp32']:5.2f}x HF fp32  "
                    f"mask agreement {100 * row['mask_agreement']:6.2f}%  {row['gflops']:4.0f} GFLOP/s = "
                    f"{100 * row['of_fp32_matmul']:3.0f}% of fp32 matmul, {own} of its own dtype's"
                )
    return out


def time_precision_paths(ours, hf, models, runner, batch: int, size: int, repeats: int) -> dict:
    pixels = torch.randn(batch, 3, size, size)
    phrases = (PHRASES * batch)[:batch]
    ids, mask = ours.tokenize(phrases)

    def torch_path(model, precision):
        def run():
            with torch.inference_mode(), precision_context(precision, "cpu"):
                return model(pixels, phrases).logits

        return run

    def hf_fp32():
        with torch.inference_mode():
            return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits

    variants = {"hf_fp32": hf_fp32, **{name: torch_path(*pair) for name, pair in models.items()}}
    if runner is not None:
        variants["onnx_fp32"] = lambda: runner.decode(runner.encode_image(pixels), runner.embed_text(phrases))
    timing = interleaved(variants, repeats)
    reference = variants["ours_fp32"]() > LOGIT_AT_THRESHOLD
    rows = {}
    for name, run in variants.items():
        masks = run().float().reshape(reference.shape) > LOGIT_AT_THRESHOLD
        rows[name] = {
            "seconds": timing[name],
            "speedup_vs_hf_fp32": timing["hf_fp32"] / timing[name],
            "mask_agreement": (masks == reference).float().mean().item(),
        }
    rows["ours_fp32"]["mask_positive_fraction"] = reference.float().mean().item()
    return rows


def onnx_runner(model, folder: Path):
    """The benchmark model exported by export.py into `folder` and loaded in onnxruntime, or None (with a
    message) when requirements-export.txt is not installed."""
    try:
        import export
        from clipseg.onnx.backend import OnnxBackendError, OnnxCLIPSeg
    except ImportError as err:
        print(f"precision paths: no ONNX row ({err})")
        return None
    print("precision paths: exporting the model to ONNX (export.py; minutes at ViT-B/16) ...")
    try:
        manifest = export.export(model, folder, source="bench.py")
    except OnnxBackendError as err:
        print(f"precision paths: no ONNX row ({err})")
        return None
    checks = manifest["difference_to_torch"].values()
    worst, relative = max(c["absolute"] for c in checks), max(c["relative"] for c in checks)
    print(f"precision paths: exported; graphs within {worst:.1e} of PyTorch ({relative:.1e} of the values' scale)")
    return OnnxCLIPSeg(folder, threads=torch.get_num_threads())  # as many threads as the torch paths


def int8_linear_rate(repeats: int, n: int = 2048) -> float:
    """GOP/s of a dynamic-quantised int8 n x n linear layer on n rows (activations quantised per call, as the
    int8 path runs them): the ceiling of `--precision int8` on this CPU."""
    layer = nn.Sequential(nn.Linear(n, n))
    quantize_linears(layer)  # the kernels and scheme of the int8 path
    rows = torch.randn(n, n)

    def run():
        with torch.inference_mode():
            return layer(rows)

    return 2 * n**3 / interleaved({"int8": run}, repeats, warmup=2)["int8"] / 1e9


def training_comparison(ours, hf, device, size, repeats, bf16: bool, batch: int = 8) -> dict:
    """Samples/s of one training step (frozen backbone, decoder trained): ours vs a plain HF loop, in fp32 and,
    where bf16 is native (`bf16`), in bf16 autocast."""
    pixels = torch.randn(batch, 3, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    phrases = PHRASES[:batch]
    ids, mask = (t.to(device) for t in ours.tokenize(phrases))
    ours.train()
    ours.text_cache = {}
    hf.train()
    hf.clip.requires_grad_(False)
    opt_ours = torch.optim.AdamW(ours.decoder.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.decoder.parameters(), lr=1e-4)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits

    def step_ours(dtype=None):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype is not None):
            loss = ours(pixels, phrases, labels=target).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        _sync(device)

    def step_hf(dtype=None):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype is not None):
            logits = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
            loss = loss_fn(logits.float()[:, None], target)
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()
        _sync(device)

    variants = {"ours_fp32": step_ours, "hf_fp32": step_hf}
    if bf16:
        variants.update(ours_bf16=lambda: step_ours(torch.bfloat16), hf_bf16=lambda: step_hf(torch.bfloat16))
    timing = interleaved(variants, repeats)
    ours.eval()
    ours.text_cache = None
    hf.eval()
    rates = {name: batch / seconds for name, seconds in timing.items()}
    out = {"batch": batch, "samples_per_s": rates, "fp32_ratio": rates["ours_fp32"] / rates["hf_fp32"]}
    line = f"training step, batch {batch}: ours fp32 {rates['ours_fp32']:.2f} samples/s, HF fp32 {rates['hf_fp32']:.2f}"
    if bf16:
        out["bf16_vs_hf_fp32"] = rates["ours_bf16"] / rates["hf_fp32"]
        out["bf16_ratio"] = rates["ours_bf16"] / rates["hf_bf16"]
        line += f", ours bf16 {rates['ours_bf16']:.2f}, HF bf16 {rates['hf_bf16']:.2f}"
    else:
        out["bf16_skipped"] = "no native bf16 on this device (train.py --amp stays in fp32 here)"
    print(line + f" (ours/HF fp32 {out['fp32_ratio']:.2f}x)")
    return out


def data_pipeline_rate(n_samples: int = 300, image_size: int = 352) -> dict:
    """Training-pipeline samples/s in one process with one torch thread (= one DataLoader worker) on generated
    500x375 JPEGs: JPEG decode, polygon rasterisation, the original's crop, resize, normalisation, 20% negatives;
    for each resize rule, interleaved. Per wall-clock second and per CPU-second (per core, which other load on the
    machine does not distort)."""
    import dataset
    from clipseg import synthetic

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
    import dataset

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
    from clipseg import synthetic

    with tempfile.TemporaryDirectory(prefix="clipseg-index-") as root:
        data_dir = synthetic.make_synthetic_phrasecut(root, n_images=40, seed=0)
        json_bytes = write_large_split(data_dir, n_tasks)
        cache = Path(root) / "index"
        command = [sys.executable, "-c", _INDEX_PROBE, root, str(cache)]
        here = str(Path(__file__).resolve().parent)
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


if __name__ == "__main__":
    sys.exit(130 if main().get("interrupted") else 0)
