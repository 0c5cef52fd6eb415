"""clipseg/decoder.py's training paths: the dropout masks and attention with dropout (the decoder's values in eval
mode are checked against transformers' in test_model.py)."""

import pytest
import torch
import torch.nn.functional as F

from clipseg.decoder import DROPOUT_LEVELS, DecoderMLP, attention_with_dropout, dropout_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_keeps_each_element_with_probability_one_minus_p(dtype, p):
    x = torch.empty(1000, 1001, dtype=dtype)
    torch.manual_seed(0)
    keep, scale = dropout_mask(x, p)
    assert keep.shape == x.shape and keep.dtype == dtype
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    kept = 1 - round(p * DROPOUT_LEVELS) / DROPOUT_LEVELS
    assert abs(kept - (1 - p)) < 1e-5 and scale == pytest.approx(1 / kept)
    assert abs(keep.float().mean().item() - kept) < 0.002  # 6 standard deviations of the mean of 1e6 draws
    rows, columns = keep.float().mean(dim=1), keep.float().mean(dim=0)
    assert rows.std() < 0.03 and columns.std() < 0.03  # no stripes: the 16-bit draws are independent
    torch.manual_seed(0)
    assert torch.equal(dropout_mask(x, p)[0], keep)  # the default generator's seed decides the mask
    assert not torch.equal(dropout_mask(x, p)[0], keep)


def test_dropout_mask_at_the_ends_of_the_range():
    x = torch.empty(64, 64)
    keep, scale = dropout_mask(x, 1e-9)  # below the mask's resolution: nothing dropped
    assert bool((keep == 1).all()) and scale == 1.0
    keep, scale = dropout_mask(x, 1.0)
    assert bool((keep == 0).all()) and scale == 0.0  # everything dropped, no infinite scale


def random_qkv(scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, 37, 8, generator=generator) * scale).requires_grad_() for _ in range(3)]


def test_attention_with_dropout_drops_attention_weights_and_rescales_the_rest():
    q, k, v = random_qkv()
    torch.manual_seed(5)
    out = attention_with_dropout(q, k, v, 0.3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.manual_seed(5)
    keep, scale = dropout_mask(weights, 0.3)
    assert 0.6 < keep.mean() < 0.8
    torch.testing.assert_close(out, (weights * keep * scale) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 10.0, 40.0])  # 40: scores hundreds apart, weights below fp32's normal range
def test_attention_with_dropout_without_drops_is_as_exact_as_scaled_dot_product_attention(spread):
    q, k, v = random_qkv(spread)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outputs = {
        "ours": (attention_with_dropout(q, k, v, 1e-9), (q, k, v)),
        "torch": (F.scaled_dot_product_attention(q, k, v), (q, k, v)),
        "float64": (F.scaled_dot_product_attention(*exact), exact),
    }
    gradient = torch.randn_like(outputs["ours"][0])
    results = {
        name: [out.double()] + [g.double() for g in torch.autograd.grad(out, inputs, gradient.to(out.dtype))]
        for name, (out, inputs) in outputs.items()
    }
    for ours, torchs, exact in zip(results["ours"], results["torch"], results["float64"]):
        assert (ours - exact).abs().max() <= max(2 * (torchs - exact).abs().max(), 1e-6 * exact.abs().max())


def test_mlp_drops_hidden_units_after_the_relu_in_training_only():
    """Its values and gradients are those of relu, then `dropout_mask`'s mask and scale (the same draws), then fc2."""
    torch.manual_seed(0)
    mlp, x = DecoderMLP(8, 32, dropout=0.25), torch.randn(4, 5, 8, requires_grad=True)
    upstream = torch.randn(4, 5, 8)
    torch.manual_seed(1)
    trained = mlp.train()(x)
    gradients = torch.autograd.grad(trained, [x, *mlp.parameters()], upstream)
    hidden = F.relu(mlp.fc1(x))
    torch.manual_seed(1)
    keep, scale = dropout_mask(hidden, 0.25)
    assert 0 < keep.mean() < 1 and (hidden > 0).float().mean() < 1  # units dropped, units negative
    reference = mlp.fc2(hidden * keep * scale)
    torch.testing.assert_close(trained, reference, rtol=1e-5, atol=1e-6)
    for ours, expected in zip(gradients, torch.autograd.grad(reference, [x, *mlp.parameters()], upstream)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp.eval()(x), mlp.fc2(hidden))
    mlp.train().dropout = 1.0
    assert torch.equal(mlp(x), mlp.fc2.bias.expand(4, 5, 8))  # everything dropped
