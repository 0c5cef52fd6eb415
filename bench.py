"""Speed of our CLIPSeg against `transformers.CLIPSegForImageSegmentation` and against this machine's limit.

    python bench.py                      # CPU, full ViT-B/16 geometry at 352 px, writes bench_results.json
    python bench.py --repeats 7 --threads 2
    python bench.py --device cuda --compile
    python bench.py --only-data --index-tasks 300000   # data pipeline per worker; PhraseCut-sized index

Both models hold the same random weights (speed does not depend on their values). Variants are interleaved
(A B A B ...) after a warm-up and the median of `--repeats` runs is reported, so drift of the machine hits both
sides alike; compare ratios, not absolute times. FLOP counts are analytic (SPEC section 7).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from model import CLIPSeg, CLIPSegConfig, RefinedHead, amp_dtype

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


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, measured A B A B ... after `warmup` rounds."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
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
        "--index-tasks",
        type=int,
        default=0,
        help="also build and load the PhraseCut index of a generated split of N tasks (300000 is PhraseCut's size)",
    )
    parser.add_argument("--out", default="bench_results.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, size, repeats = args.device, args.image_size, args.repeats
    results: dict = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        },
        "image_size": size,
        "repeats": repeats,
    }
    if args.only_data:
        results["data_pipeline"] = data_pipeline_rate(image_size=size)
        if args.index_tasks:
            results["index"] = index_rate(args.index_tasks)
        Path(args.out).write_text(json.dumps(results, indent=2))
        return results
    results["refined_head"] = refined_head_comparison(device, size, repeats)
    if args.only_head:
        Path(args.out).write_text(json.dumps(results, indent=2))
        return results
    native = native_bf16(device)
    bf16_side = 2048 if native else 512  # emulated bf16: a 2048^3 matmul takes about a minute
    results["native_bf16"] = native
    results["matmul_gflops"] = {
        "fp32": matmul_rate(torch.float32, device, repeats),
        "bf16": matmul_rate(torch.bfloat16, device, repeats, n=bf16_side),
        "bf16_side": bf16_side,
    }
    rates = results["matmul_gflops"]
    print(
        f"matmul: fp32 {rates['fp32']:.1f} GFLOP/s (2048^3), bf16 {rates['bf16']:.1f} GFLOP/s ({bf16_side}^3)"
        + ("" if native else "; no native bf16 on this device: bf16 is emulated")
    )

    ours, hf = build_models(device, args.refined)
    if args.compile:
        ours.decoder = torch.compile(ours.decoder)
    tokens = (size // 16) ** 2 + 1
    deepest = max(ours.config.extract_layers) + 1
    text_tokens = max(len(ours.tokenize([p])[0][0]) for p in PHRASES)
    flops_ours = vit_flops(tokens, deepest) + text_flops(text_tokens) + decoder_flops(tokens)
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
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


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
    import synthetic

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
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
            file.write(("," if number else "") + json.dumps(task))
        file.write("]")
    return path.stat().st_size


def index_rate(n_tasks: int) -> dict:
    """Build and load the PhraseCut index of an `n_tasks`-task refer_train.json, each in a fresh process:
    seconds and resident memory."""
    import synthetic

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
    main()
