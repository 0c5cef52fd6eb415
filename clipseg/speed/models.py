"""Our CLIPSeg against `transformers.CLIPSegForImageSegmentation`, both at the full ViT-B/16 geometry with the same
random weights (speed does not depend on their values): the fp32 forward (one prompt per image, one image with ten
prompts), our bf16 forward, the CPU precision paths (fp32, bf16, int8, ONNX, OpenVINO fp32/bf16/int8) with their mask
agreement and whether predict.py's default precision is this machine's fastest path that keeps fp32's masks
(`default_check`), a training step, and the refined head against the same layers run one by one. Each function times
its variants interleaved (clipseg/speed/timing.py), prints its rows and returns them for bench.py's JSON.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from torch import Tensor, nn

from clipseg.config import CLIPSegConfig
from clipseg.decoder import RefinedHead
from clipseg.postprocess import PAPER_LOGIT
from clipseg.precision import MASK_AGREEMENT_BAR, cpu_class, default_path, precision_context, prepare_model
from clipseg.speed.timing import decoder_flops, interleaved, native_bf16, sync, text_flops, vit_flops
from model import CLIPSeg

if TYPE_CHECKING:
    from clipseg.onnx.backend import OnnxCLIPSeg

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


def forward_flops(model: CLIPSeg, size: int, prompts: int = 1) -> float:
    """Analytic FLOPs of one image at `size` px and `prompts` prompts as long as the longest of PHRASES: the vision
    tower up to the deepest extracted block once, the text tower and the decoder once per prompt."""
    tokens = (size // 16) ** 2 + 1
    deepest = max(model.config.extract_layers) + 1
    text_tokens = max(len(model.tokenize([p])[0][0]) for p in PHRASES)
    return vit_flops(tokens, deepest) + prompts * (text_flops(text_tokens) + decoder_flops(tokens))


def forward_comparison(
    ours: CLIPSeg, hf: transformers.CLIPSegForImageSegmentation, device: str, size: int, repeats: int
) -> list[dict]:
    """Our fp32 forward against HF's, interleaved: one prompt per image at batch 1 and 8, and one image with ten
    prompts (encoded once by us, ten times by HF). A row per case: both latencies, their ratio, our GFLOP/s."""
    rows = []
    flops_ours = forward_flops(ours, size)

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
                return sync(device, ours(pixels, phrases).logits)

        def run_hf(pixels=pixels, ids=ids, mask=mask):
            with torch.inference_mode():
                return sync(device, hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits)

        compare(f"1 prompt per image, batch {batch}, fp32", batch, batch, run_ours, run_hf, batch * flops_ours)

    one = torch.randn(1, 3, size, size, device=device)
    ids, mask = ours.tokenize(PHRASES)
    ids, mask = ids.to(device), mask.to(device)

    def ours_many():
        with torch.inference_mode():
            return sync(device, ours.predict_prompts(one, phrases=PHRASES))

    def hf_many():
        with torch.inference_mode():
            return sync(device, hf(pixel_values=one.expand(10, -1, -1, -1), input_ids=ids, attention_mask=mask).logits)

    many_flops = forward_flops(ours, size, prompts=10)
    compare("1 image, 10 prompts, fp32", 1, 10, ours_many, hf_many, many_flops)
    return rows


def bf16_comparison(
    ours: CLIPSeg,
    hf: transformers.CLIPSegForImageSegmentation,
    device: str,
    size: int,
    repeats: int,
    rows: list[dict],
    flops: float,
    batch: int,
    matmul_side: int | None = None,
) -> dict:
    """Our bf16-autocast forward vs HF fp32, how many mask pixels (p > 0.5) agree with our fp32 masks, and, with
    `matmul_side` n, our GFLOP/s as a share of the machine's bf16 rate: an n^3 bf16 matmul timed interleaved with the
    forwards, so that a busy machine slows both alike."""
    pixels = torch.randn(batch, 3, size, size, device=device)
    phrases = PHRASES[:batch]
    ids, mask = ours.tokenize(phrases)

    def ours_bf16():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            return sync(device, ours(pixels, phrases).logits)

    def hf_fp32():
        with torch.inference_mode():
            return sync(
                device, hf(pixel_values=pixels, input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            )

    variants = {"ours_bf16": ours_bf16, "hf_fp32": hf_fp32}
    if matmul_side:
        a, b = (torch.randn(matmul_side, matmul_side, device=device, dtype=torch.bfloat16) for _ in range(2))
        variants["matmul_bf16"] = lambda: sync(device, a @ b)
    timing = interleaved(variants, repeats)
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
    gflops = rows[-1]["ours_gflops"]
    rate = 2 * matmul_side**3 / timing["matmul_bf16"] / 1e9 if matmul_side else None
    share = gflops / rate if rate else None
    print(
        f"bf16 ours vs fp32 HF, batch {batch}: {speedup:.2f}x faster, mask agreement {100 * agreement:.2f}%, "
        f"{gflops:.0f} GFLOP/s"
        + (f" = {100 * share:.0f}% of the bf16 matmul rate timed with it ({rate:.0f} GFLOP/s)" if rate else "")
    )
    return {
        "batch": batch,
        "speedup_vs_hf_fp32": speedup,
        "mask_agreement": agreement,
        "gflops": gflops,
        "bf16_matmul_gflops": rate,
        "of_bf16_matmul": share,
    }


def precision_paths(
    ours: CLIPSeg,
    hf: transformers.CLIPSegForImageSegmentation,
    device: str,
    size: int,
    repeats: int,
    flops: float,
    rates: dict,
) -> dict:
    """Our fp32, bf16, int8, ONNX and OpenVINO paths against the HF class in fp32, interleaved in one run, at batch 1
    and 8 with one prompt per image (text encoded in each call, as HF does): median latency, speed-up over HF fp32,
    mask agreement (probability > 0.3) with our fp32 on the random-noise inputs timed and on real-looking images
    (`scene_images`), GFLOP/s, and that rate as a fraction of the machine's fp32 matmul rate and of the path's own
    dtype's rate."""
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
        runner = onnx_runner(ours, Path(tmp) / "onnx")
        runners = {"onnx_fp32": runner} if runner is not None else {}
        if runner is not None:
            runners.update(openvino_runners(ours, Path(tmp)))
        paths = path_functions(hf, models, runners)
        scenes = scene_agreement(paths, size)
        out = {}
        for batch in (1, 8):
            out[f"batch_{batch}"] = time_precision_paths(paths, batch, size, repeats)
            print(f"precision paths, batch {batch}, 1 prompt per image, {size} px:")
            for name, row in out[f"batch_{batch}"].items():
                precision = "fp32" if name == "hf_fp32" else models[name][1] if name in models else name.split("_")[1]
                row["scene_agreement"] = scenes[name]
                row["gflops"] = batch * flops / row["seconds"] / 1e9
                row["of_fp32_matmul"] = row["gflops"] / rates["fp32"]
                row["of_own_matmul"] = row["gflops"] / own_rate[precision] if own_rate[precision] else None
                own = f"{100 * row['of_own_matmul']:4.0f}%" if row["of_own_matmul"] else "   -"
                print(
                    f"  {name:15s} {row['seconds'] * 1e3:7.0f} ms  {row['speedup_vs_hf_fp32']:5.2f}x HF fp32  "
                    f"mask agreement {100 * row['mask_agreement']:6.2f}% (noise) {100 * scenes[name]:6.2f}% (scenes)  "
                    f"{row['gflops']:4.0f} GFLOP/s = {100 * row['of_fp32_matmul']:3.0f}% of fp32 matmul, {own} of its "
                    "own dtype's"
                )
    out["default"] = default_check(out["batch_1"], default_path(device, "predict"))
    print(describe_default_check(out["default"]))
    return out


def path_functions(hf: transformers.CLIPSegForImageSegmentation, models: dict, runners: dict) -> dict:
    """name -> f(pixels (B, 3, S, S), phrases (B of them)) -> logits, one prompt per image, for the HF class in fp32,
    our PyTorch `models` ({name: (model, precision)}) and the exported `runners` (text embedded in each call)."""

    def torch_path(model, precision):
        def run(pixels, phrases):
            with torch.inference_mode(), precision_context(precision, "cpu"):
                return model(pixels, phrases).logits

        return run

    def hf_fp32(pixels, phrases):
        ids, mask = models["ours_fp32"][0].tokenize(phrases)
        with torch.inference_mode():
            return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits

    def exported(runner):
        def run(pixels, phrases):
            return runner.decode(runner.encode_image(pixels), runner.embed_text(phrases))

        return run

    functions = {"hf_fp32": hf_fp32, **{name: torch_path(*pair) for name, pair in models.items()}}
    return functions | {name: exported(runner) for name, runner in runners.items()}


SCENE_SEED = 7  # generated scenes apart from the calibration images (the examples are made with other seeds)


def scene_images(size: int, count: int = 6) -> list[Tensor]:
    """Real-looking (1, 3, size, size) inputs: the shipped examples/*.jpg and `count` generated scenes (textured
    backgrounds with coloured shapes, clipseg.scenes'), squashed to size x size and normalised."""
    from clipseg.images import load_image
    from clipseg.scenes import photo_like_images
    from clipseg.transforms import ImageTransform

    transform = ImageTransform("pil", size, square=True, multiple=16)
    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.jpg"))
    images = [load_image(path) for path in examples] + photo_like_images(SCENE_SEED, count)
    return [transform.pixels(image)[None] for image in images]


def scene_agreement(paths: dict, size: int) -> dict:
    """name -> the share of mask pixels (probability > 0.3) that agree with our fp32 over `scene_images` against
    three of PHRASES each."""
    phrases = PHRASES[:3]
    agreeing = dict.fromkeys(paths, 0.0)
    total = 0
    for pixels in scene_images(size):
        batch = pixels.expand(len(phrases), -1, -1, -1)
        reference = paths["ours_fp32"](batch, phrases) > PAPER_LOGIT
        total += reference.numel()
        for name, run in paths.items():
            masks = run(batch, phrases).float().reshape(reference.shape) > PAPER_LOGIT
            agreeing[name] += (masks == reference).sum().item()
    return {name: count / total for name, count in agreeing.items()}


def path_of_row(name: str) -> tuple[str, str] | None:
    """A precision-paths row's (backend, precision) as the commands name them, or None for a row that is no
    command's default (the HF class; ONNX, which needs an export step of its own)."""
    if name.startswith("ours_"):
        return "torch", name.removeprefix("ours_")
    if name.startswith("openvino_") and not name.endswith("_generic"):
        return "openvino", name.removeprefix("openvino_")
    return None


def default_check(rows: dict, default: tuple[str, str], bar: float = MASK_AGREEMENT_BAR) -> dict:
    """Whether `default` (predict.py's default (backend, precision) on this machine) is the fastest of the measured
    paths (`time_precision_paths` rows, batch 1, as the rule in clipseg/precision.py was measured) whose masks agree
    with our fp32's on at least `bar` of the pixels, on the noise inputs and on the scenes alike."""
    kept = {}
    for name, row in rows.items():
        path = path_of_row(name)
        if path and min(row["mask_agreement"], row.get("scene_agreement", 1.0)) >= bar:
            kept[" ".join(path)] = row["seconds"]
    fastest = min(kept, key=kept.get)
    return {
        "cpu_class": cpu_class(),
        "default": " ".join(default),
        "fastest": fastest,
        "default_is_fastest": " ".join(default) == fastest,
        "seconds": kept,
        "mask_agreement_bar": bar,
    }


def describe_default_check(check: dict) -> str:
    """The line bench.py prints for `default_check`."""
    default, fastest, seconds = check["default"], check["fastest"], check["seconds"]
    head = (
        f"predict.py's default on this CPU (class {check['cpu_class']}): {default}; the fastest measured path that "
        f"keeps >= {100 * check['mask_agreement_bar']:.1f}% of fp32's mask pixels: {fastest}"
    )
    if check["default_is_fastest"]:
        return f"{head} (the default is this machine's fastest)"
    own = f"{seconds[default] * 1e3:.0f} ms" if default in seconds else "below the bar or not measured"
    return (
        f"{head} ({seconds[fastest] * 1e3:.0f} ms against the default's {own}): the rule in clipseg/precision.py "
        "does not fit this CPU"
    )


def time_precision_paths(paths: dict, batch: int, size: int, repeats: int) -> dict:
    """Each of `paths` (`path_functions`) timed interleaved at `batch` random-noise images of size px, one prompt
    each: seconds, speed-up over HF fp32 and mask agreement with our fp32."""
    pixels = torch.randn(batch, 3, size, size)
    phrases = (PHRASES * batch)[:batch]
    variants = {name: functools.partial(run, pixels, phrases) for name, run in paths.items()}
    timing = interleaved(variants, repeats)
    reference = variants["ours_fp32"]() > PAPER_LOGIT
    rows = {}
    for name, run in variants.items():
        masks = run().float().reshape(reference.shape) > PAPER_LOGIT
        rows[name] = {
            "seconds": timing[name],
            "speedup_vs_hf_fp32": timing["hf_fp32"] / timing[name],
            "mask_agreement": (masks == reference).float().mean().item(),
        }
    rows["ours_fp32"]["mask_positive_fraction"] = reference.float().mean().item()
    return rows


def onnx_runner(model: CLIPSeg, folder: Path) -> OnnxCLIPSeg | None:
    """The benchmark model exported into `folder` (clipseg/onnx/export.py, export.py's graphs) and loaded in
    onnxruntime, or None (with a message) when requirements-export.txt is not installed."""
    try:
        from clipseg.onnx import export as onnx_export
        from clipseg.onnx.backend import OnnxBackendError, OnnxCLIPSeg
    except ImportError as err:
        print(f"precision paths: no ONNX row ({err})")
        return None
    print("precision paths: exporting the model to ONNX (export.py; minutes at ViT-B/16) ...")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = onnx_export.export(model, folder, source="bench.py")
    except OnnxBackendError as err:
        print(f"precision paths: no ONNX row ({err})")
        return None
    checks = manifest["difference_to_torch"].values()
    worst, relative = max(c["absolute"] for c in checks), max(c["relative"] for c in checks)
    print(f"precision paths: exported; graphs within {worst:.1e} of PyTorch ({relative:.1e} of the values' scale)")
    return OnnxCLIPSeg(folder, threads=torch.get_num_threads())  # as many threads as the torch paths


def openvino_runners(model: CLIPSeg, folder: Path) -> dict:
    """The benchmark model's ONNX export in `folder`/onnx converted to OpenVINO in fp32, bf16 (native bf16 only) and
    int8 (NNCF, calibrated on the shipped examples and generated scenes), loaded with torch's thread count:
    {"openvino_<precision>": runner} with its graphs compiled for each shape at its first call, the warm-up (as
    predict.py runs once it has seen STATIC_AFTER images of a shape), and "openvino_int8_generic": the int8
    export's shape-generic graphs (the first images of each shape); empty (with a message) without
    requirements-openvino.txt. int8 is exported as `--backend auto` converts it (the first of its recipes that
    passes the 99.5% bar); a conversion that fails its check is exported again without a bar (the fastest recipe),
    so every row is reported with its agreement."""
    from clipseg.onnx.openvino_backend import OpenVinoBackendError, OpenVinoCLIPSeg, openvino_bf16

    try:
        precisions = ["fp32", "bf16", "int8"] if openvino_bf16() else ["fp32", "int8"]
    except OpenVinoBackendError as err:
        print(f"precision paths: no OpenVINO rows ({err})")
        return {}
    from clipseg.onnx.openvino_export import AccuracyCheckFailed, export_openvino

    runners = {}
    for precision in precisions:
        print(f"precision paths: converting the ONNX graphs to OpenVINO {precision} (a minute or more at ViT-B/16) ...")
        out = folder / f"openvino_{precision}"
        export = functools.partial(export_openvino, model, out, precision, source="bench.py", onnx_dir=folder / "onnx")
        try:
            try:
                manifest = export() if precision == "int8" else export(bar=0)
            except AccuracyCheckFailed as err:
                print(f"precision paths: {err}; the int8 row is the fastest recipe without the bar")
                manifest = export(bar=0)
        except OpenVinoBackendError as err:
            print(f"precision paths: no OpenVINO {precision} row ({err})")
            continue
        check = manifest["accuracy_check"]
        kept = manifest.get("quantisation", {}).get("kept_in_floating_point")
        print(
            f"precision paths: OpenVINO {precision}: export check {100 * check['mask_agreement']:.2f}% agreement"
            + (f"; kept in floating point: {kept}" if kept else "")
        )
        runners[f"openvino_{precision}"] = OpenVinoCLIPSeg(out, threads=torch.get_num_threads(), static_after=1)
        if precision == "int8":  # the shape-generic graph as well: what the first images of each shape run
            runners["openvino_int8_generic"] = OpenVinoCLIPSeg(out, threads=torch.get_num_threads(), static_after=None)
    return runners


# Training steps timed after this many rounds of every variant: a run's first steps are slower than its thousands of
# later ones while the C allocator settles (glibc raises its threshold for serving large blocks from the heap
# instead of fresh mappings one freed block at a time, and each fresh page costs a fault). On an AVX512-VNNI EPYC,
# one thread, batch 8, our decoder's forward faulted in 167k, 114k, 107k, 53k, 8k, 8k, 0 pages in its first 7 steps
# (1,757 ms in the first, 259-349 ms from the fifth on) and the frozen encoder's none from the third: with one round
# the comparison measured that transient (ours/HF fp32 1.05x), with four the end of it (1.08-1.10x).
TRAINING_WARMUP = 8


def training_comparison(
    ours: CLIPSeg,
    hf: transformers.CLIPSegForImageSegmentation,
    device: str,
    size: int,
    repeats: int,
    bf16: bool,
    batch: int = 8,
) -> dict:
    """Samples/s of one training step (frozen backbone, decoder trained) once steps are steady (TRAINING_WARMUP):
    ours vs a plain HF loop, in fp32 and, where bf16 is native (`bf16`), in bf16 autocast. Each precision's two steps
    are timed interleaved, apart from the other precision's, as a training run takes steps in one precision: with
    bf16 steps between them, our fp32 steps faulted in some 400 MB of fresh pages each (the allocator's free memory
    shaped by the other precision's tensors) and took 8.2 s instead of 7.3 (VNNI EPYC, one thread, batch 8)."""
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
        sync(device)

    def step_hf(dtype=None):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype is not None):
            logits = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
            loss = loss_fn(logits.float()[:, None], target)
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()
        sync(device)

    timing = interleaved({"ours_fp32": step_ours, "hf_fp32": step_hf}, repeats, warmup=TRAINING_WARMUP)
    if bf16:
        steps = {"ours_bf16": lambda: step_ours(torch.bfloat16), "hf_bf16": lambda: step_hf(torch.bfloat16)}
        timing |= interleaved(steps, repeats, warmup=TRAINING_WARMUP)
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


def refined_head_comparison(device: str, size: int, repeats: int, batch: int = 32) -> dict:
    """Our refined head (transposed convolutions as matrix products) against the same weights run layer by layer
    through nn.Conv2d / nn.ConvTranspose2d, on a (batch, 64, size/16, size/16) input: inference and training."""
    head = RefinedHead(64).to(device)
    grid = torch.randn(batch, 64, size // 16, size // 16, device=device, requires_grad=True)
    upstream = torch.randn(batch, 1, size, size, device=device)

    def infer(forward):
        with torch.inference_mode():
            return sync(device, forward(head, grid))

    def train(forward):
        forward(head, grid).backward(upstream)
        return sync(device, grid.grad)

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
