"""clipseg.speed.models: the bf16 row says how close our bf16 forward comes to the machine's bf16 matmul rate, timed
with it; the precision paths' mask agreement on real-looking images (the examples and generated scenes)."""

import pytest
import torch
import transformers

from clipseg.speed.models import (
    PAPER_LOGIT,
    PHRASES,
    bf16_comparison,
    path_functions,
    scene_agreement,
    scene_images,
)
from model import CLIPSeg


@pytest.mark.parametrize("matmul_side", [64, None])
def test_bf16_row_reports_its_share_of_the_bf16_matmul_rate(tiny_checkpoint, capsys, matmul_side):
    tiny_dir = tiny_checkpoint()
    ours = CLIPSeg.from_pretrained(tiny_dir).eval()
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(tiny_dir).eval()
    rows = []
    out = bf16_comparison(ours, hf, "cpu", 64, repeats=1, rows=rows, flops=2e6, batch=2, matmul_side=matmul_side)
    printed = capsys.readouterr().out
    assert out["gflops"] == pytest.approx(2 * 2e6 / rows[0]["ours_s"] / 1e9) == rows[0]["ours_gflops"]
    assert 0.5 <= out["mask_agreement"] <= 1
    if matmul_side is None:  # emulated bf16: no matmul rate to compare with
        assert out["of_bf16_matmul"] is None and "of the bf16 matmul rate" not in printed
    else:
        rate = out["bf16_matmul_gflops"]
        assert rate > 0 and out["of_bf16_matmul"] == pytest.approx(out["gflops"] / rate)
        share = f"{100 * out['of_bf16_matmul']:.0f}% of the bf16 matmul rate timed with it ({rate:.0f} GFLOP/s)"
        assert f"{out['gflops']:.0f} GFLOP/s = {share}" in printed


def test_the_paths_are_compared_on_real_looking_images_too(tiny_checkpoint):
    ours = CLIPSeg.from_pretrained(tiny_checkpoint()).eval()
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(tiny_checkpoint()).eval()
    images = scene_images(64)
    assert len(images) == 3 + 6 and all(image.shape == (1, 3, 64, 64) for image in images)
    assert images[0].std() > 0.1 and not torch.equal(images[3], images[4])  # the examples, then distinct scenes
    paths = path_functions(hf, {"ours_fp32": (ours, "fp32")}, {})
    paths["inverted"] = lambda pixels, phrases: -paths["ours_fp32"](pixels, phrases)
    paths["shifted"] = lambda pixels, phrases: paths["ours_fp32"](pixels, phrases) + 1.0
    agreement = scene_agreement(paths, 64)
    assert agreement["ours_fp32"] == 1.0 and agreement["hf_fp32"] > 0.999  # the HF class computes the same model
    with torch.no_grad():
        logits = torch.cat([ours(image.expand(3, -1, -1, -1), PHRASES[:3]).logits for image in images])
    masks = logits > PAPER_LOGIT
    for name, changed in (("shifted", logits + 1.0), ("inverted", -logits)):  # over all images, phrases and pixels
        expected = (masks == (changed > PAPER_LOGIT)).float().mean().item()
        assert agreement[name] == pytest.approx(expected) and expected < 1
