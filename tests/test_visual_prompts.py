"""clipseg/visual_prompts.py: the prompt image is the original's crop_blur_highlight352 (cv2's Gaussian blur, the
box grown by a tenth, padding), from files or arrays."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg.transforms import ImageTransform
from clipseg.visual_prompts import gaussian_blur, support_prompt, visual_prompt


def blur_reference(image: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(15x15, sigma 3, BORDER_REFLECT_101) as a direct 2-D sum."""
    x = np.arange(15) - 7
    kernel = np.exp(-(x**2) / 18.0)
    kernel = np.outer(kernel, kernel) / kernel.sum() ** 2
    array = image.double().numpy()
    padded = np.pad(array, ((0, 0), (7, 7), (7, 7)), mode="reflect")  # numpy's reflect = reflect-101
    out = np.zeros_like(array)
    for dy in range(15):
        for dx in range(15):
            out += kernel[dy, dx] * padded[:, dy : dy + array.shape[1], dx : dx + array.shape[2]]
    return torch.from_numpy(out).float()


def test_blur_is_cv2s_gaussian_with_reflect_101_borders():
    image = torch.randn(3, 40, 30)
    torch.testing.assert_close(gaussian_blur(image), blur_reference(image), atol=1e-5, rtol=0)


def test_empty_mask_prompt_is_a_tenth_of_the_blurred_image():
    image = torch.randn(3, 64, 64)
    prompt = visual_prompt(image, torch.zeros(64, 64), size=64)
    torch.testing.assert_close(prompt, 0.1 * gaussian_blur(image), atol=1e-6, rtol=0)
    torch.testing.assert_close(prompt, 0.1 * blur_reference(image), atol=1e-5, rtol=0)


def test_visual_prompt_crops_blurs_and_pads():
    image = torch.randn(3, 100, 100)
    mask = torch.zeros(100, 100)
    mask[40:60, 20:80] = 1  # 20 x 60 box, grown by 10%: rows 38..62, cols 14..86 -> 24 x 72, padded to 72 x 72
    prompt = visual_prompt(image, mask, size=72)
    assert prompt.shape == (3, 72, 72)
    assert torch.equal(prompt[:, :24], torch.zeros(3, 24, 72))  # top padding of (72 - 24) / 2 rows
    assert torch.equal(prompt[:, 24 + 2 : 24 + 22, 6:66], image[:, 40:60, 20:80])  # object kept as is
    torch.testing.assert_close(prompt[:, 24, :], 0.1 * gaussian_blur(image)[:, 38, 14:86])  # context: 10% blurred
    with pytest.raises(ValueError, match="must match"):
        visual_prompt(image, torch.zeros(10, 10))


def test_visual_prompt_box_grows_by_a_tenth_of_its_extent_truncated_and_clamped():
    image = torch.randn(3, 50, 50)
    mask = np.zeros((50, 50), dtype=bool)
    mask[3:10, 41:48] = True  # rows/cols 3..9 and 41..47; 7 wide: each side grows by 0.7, truncated
    prompt = visual_prompt(image, mask, size=8)  # int(3 - 0.7) = 2, int(10 + 0.7) = 10: rows 2..9, cols 40..47
    composite = image * torch.from_numpy(mask) + 0.1 * gaussian_blur(image) * ~torch.from_numpy(mask)
    torch.testing.assert_close(prompt, composite[:, 2:10, 40:48])


def test_support_prompt_reads_files_and_checks_sizes(tmp_path):
    array = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "support.png")
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    transform = ImageTransform("original", 32)
    prompt = support_prompt(tmp_path / "support.png", tmp_path / "mask.png", transform)
    expected = visual_prompt(transform.pixels(Image.fromarray(array)), transform.mask(mask > 0), size=32)
    assert torch.equal(prompt, expected)
    Image.fromarray(mask[:20]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="support mask is 60x20 but its image is 60x40"):
        support_prompt(tmp_path / "support.png", tmp_path / "small.png", transform)
    Image.fromarray(mask * 0).save(tmp_path / "black.png")  # predict.py took it: the whole image, blurred
    with pytest.raises(ValueError, match="the support mask has no object: give a mask whose object is white"):
        support_prompt(tmp_path / "support.png", tmp_path / "black.png", transform)


# ------------------------------------------------------------------------------------------- masks, logits
