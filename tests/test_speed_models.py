"""clipseg.speed.models: the bf16 row says how close our bf16 forward comes to the machine's bf16 matmul rate, timed
with it."""

import pytest
import transformers

from clipseg.speed.models import bf16_comparison
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
