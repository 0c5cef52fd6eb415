"""clipseg.speed.models: the bf16 row says how close our bf16 forward comes to the machine's bf16 matmul rate."""

import pytest
import transformers

from clipseg.speed.models import bf16_comparison
from model import CLIPSeg


@pytest.mark.parametrize("bf16_rate", [500.0, None])
def test_bf16_row_reports_its_share_of_the_bf16_matmul_rate(tiny_checkpoint, capsys, bf16_rate):
    tiny_dir = tiny_checkpoint()
    ours = CLIPSeg.from_pretrained(tiny_dir).eval()
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(tiny_dir).eval()
    rows = []
    out = bf16_comparison(ours, hf, "cpu", 64, repeats=1, rows=rows, flops=2e6, batch=2, bf16_rate=bf16_rate)
    printed = capsys.readouterr().out
    assert out["gflops"] == pytest.approx(2 * 2e6 / rows[0]["ours_s"] / 1e9) == rows[0]["ours_gflops"]
    assert 0.5 <= out["mask_agreement"] <= 1
    if bf16_rate is None:  # emulated bf16: no full-size matmul rate to compare with
        assert out["of_bf16_matmul"] is None and "of the bf16 matmul rate" not in printed
    else:
        assert out["of_bf16_matmul"] == pytest.approx(out["gflops"] / bf16_rate)
        assert f"{out['gflops']:.0f} GFLOP/s = {100 * out['of_bf16_matmul']:.0f}% of the bf16 matmul rate" in printed
