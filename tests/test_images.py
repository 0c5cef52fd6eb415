"""clipseg/images.py: images and masks are read robustly (modes, palettes, EXIF rotation, 16 bits, decompression
bombs) by one rule for every mask a user gives."""

import numpy as np
import pytest
from PIL import Image

from clipseg import images
from clipseg.images import UnreadableImage, open_rgb, read_mask, upright_size


@pytest.mark.parametrize(
    "values, expected, binary",
    [
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], True),
        ([[0, 255], [255, 0]], [[0, 1], [1, 0]], True),
        ([[0, 100], [100, 0]], [[0, 1], [1, 0]], True),  # a mask that is not white still has its object
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], True),
        ([[0, 250], [120, 130]], [[0, 1], [0, 1]], False),  # soft: at least half the maximum
    ],
)
def test_read_mask_rule(tmp_path, values, expected, binary):
    array = np.array(values, dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "mask.png")
    for source in (tmp_path / "mask.png", Image.fromarray(array), array):
        mask, was_binary = read_mask(source)
        np.testing.assert_array_equal(mask, np.array(expected, dtype=bool))
        assert was_binary == binary


def test_read_mask_colour_sixteen_bit_and_bad_files(tmp_path):
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[1:3, 1:3] = (0, 0, 255)  # a blue object on black: its luminance is only 29
    Image.fromarray(blue).save(tmp_path / "blue.png")
    assert read_mask(tmp_path / "blue.png")[0].sum() == 4
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "deep.png")[0], [[False, True]])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty.png: empty file"):
        read_mask(tmp_path / "empty.png")


def solid(mode: str, value, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "image, suffix, expected",
    [
        (solid("L", 100), ".png", (100, 100, 100)),
        (solid("RGBA", (200, 10, 10, 0)), ".png", (0, 0, 0)),
        (solid("RGBA", (200, 10, 10, 255)), ".png", (200, 10, 10)),
        (solid("CMYK", (0, 255, 255, 0)), ".jpg", (255, 0, 0)),
        (solid("I;16", 65535), ".png", (255, 255, 255)),
        (solid("RGB", (1, 2, 3), size=(1, 1)), ".png", (1, 2, 3)),
        (solid("F", 0.5), ".tif", (127, 127, 127)),  # a float image in [0, 1] read black
        (solid("F", 200.0), ".tif", (200, 200, 200)),
        (solid("I", 3_000_000), ".tif", (255, 255, 255)),  # its own maximum: white, not clipped
    ],
    ids=["grayscale", "transparent", "opaque-rgba", "cmyk", "16-bit", "1x1", "float-unit", "float-8bit", "int32"],
)
def test_open_rgb_converts_modes(tmp_path, image, suffix, expected):
    path = tmp_path / f"image{suffix}"
    image.save(path)
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected, atol=3)


def test_a_float_image_in_unit_range_with_an_overshoot_stays_in_unit_range(tmp_path):
    """One pixel at 1.05 (a resampling overshoot) made the whole [0, 1] image read black; one at 40 (a hot pixel)
    is clipped too, as long as nearly all the image stays in [0, 1]."""
    values = np.linspace(0.05, 0.95, 600, dtype=np.float32).reshape(20, 30)
    for overshoot in (1.05, 40.0):
        values[0, 0] = overshoot
        Image.fromarray(values, mode="F").save(tmp_path / "unit.tif")
        gray = np.asarray(open_rgb(tmp_path / "unit.tif"))[..., 0].astype(float)
        np.testing.assert_allclose(gray, np.clip(values * 255, 0, 255), atol=1)


def test_a_32_bit_image_is_scaled_by_its_own_range(tmp_path):
    """A 32-bit integer TIFF beyond 16 bits came out mostly white (its values / 257, clipped)."""
    ramp = np.linspace(0, 4_000_000, 24, dtype=np.int32).reshape(4, 6)
    Image.fromarray(ramp, mode="I").save(tmp_path / "ramp.tif")
    gray = np.asarray(open_rgb(tmp_path / "ramp.tif"))[..., 0]
    np.testing.assert_allclose(gray, ramp * (255 / 4_000_000), atol=1)


def test_open_rgb_palette_and_exif_rotation(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "palette.png"))[0, 0], (10, 200, 30))
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    upright = np.asarray(open_rgb(tmp_path / "rotated.png"))
    assert upright.shape == (8, 4, 3)
    assert (upright[:4, :, 0] == 255).all() and (upright[4:, :, 0] == 0).all()  # left half became the top
    assert upright_size(tmp_path / "rotated.png") == (4, 8)


def test_open_rgb_refuses_decompression_bombs(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UnreadableImage, match="big.png: too large"):
        open_rgb(tmp_path / "big.png")
