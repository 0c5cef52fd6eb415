"""predict.py: the Predictor API against plain forward passes, image inputs, the CLI's files, summary and errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import predict
from clipseg import images
from clipseg import precision as precision_module
from clipseg.images import load_image
from clipseg.outputs import is_safe_name
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD
from clipseg.visual_prompts import visual_prompt
from model import CLIPSeg
from predict import PALETTE, Predictor, build_prompts, draw_overlay, image_output_names, main, merge_duplicates

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 64  # short side used in these tests (the tiny CLIP takes any multiple of 16)
PHRASES = ["a red circle", "the blue square", "sky"]
NASTY_PROMPTS = ["../../etc/passwd", "/", "..", "a\x00b", "x" * 500, "猫 on the mat", "CON", "a/b\\c:d*e?"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return CLIPSeg.from_pretrained(tiny_dir).eval()


@pytest.fixture
def predictor(model):
    return Predictor(model, image_size=SIZE)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def normalised(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Independent reference preprocessing: (3, H, W) ImageNet-normalised pixels at `size` = (W, H)."""
    array = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def reference_probs(model, pixels, original_size, **prompt) -> np.ndarray:
    """One plain forward pass of one prompt, logits resized bilinearly to (W0, H0), then sigmoid: (H0, W0)."""
    with torch.no_grad():
        logits = model(pixels[None], **prompt).logits
    width, height = original_size
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].numpy()


def write_support(tmp_path: Path) -> tuple[Path, Path]:
    support, mask = tmp_path / "support.png", tmp_path / "support_mask.png"
    random_image(80, 60, seed=7).save(support)
    mask_array = np.zeros((60, 80), dtype=np.uint8)
    mask_array[10:40, 20:50] = 255
    Image.fromarray(mask_array).save(mask)
    return support, mask


# ------------------------------------------------------------------------------------------------ the API


def test_k_prompts_equal_k_independent_forward_passes(model, predictor, tmp_path):
    image = random_image(80, 50)
    support, mask = write_support(tmp_path)
    prompt_image = random_image(40, 40, seed=3)
    predictor.set_image(image)
    probs = predictor.predict(phrases=PHRASES, prompt_images=[prompt_image], support=[(support, mask)])

    assert predictor.input_size == (96, 64)  # short side 50 -> 64, long side 80 * 64 / 50 = 102.4 -> 96
    assert probs.shape == (len(PHRASES) + 2, 50, 80) and probs.dtype == np.float32
    pixels = normalised(image, (96, 64))
    side = model.config.image_size
    support_mask = torch.from_numpy(np.asarray(Image.open(mask).resize((side, side), Image.NEAREST)) > 0)
    engineered = visual_prompt(normalised(Image.open(support), (side, side)), support_mask)
    expected = [reference_probs(model, pixels, image.size, phrases=[p]) for p in PHRASES]
    expected.append(
        reference_probs(model, pixels, image.size, prompt_images=normalised(prompt_image, (side, side))[None])
    )
    expected.append(reference_probs(model, pixels, image.size, prompt_images=engineered[None]))
    for got, want in zip(probs, expected):
        assert np.abs(got - want).max() <= 1e-5
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # the prompts really differ


def test_maps_are_at_the_original_size_of_rectangular_images(predictor):
    for width, height in [(120, 45), (33, 77), (400, 20)]:
        predictor.set_image(random_image(width, height))
        probs = predictor.predict(phrases=PHRASES[:2])
        assert probs.shape == (2, height, width)
        assert probs.min() >= 0 and probs.max() <= 1
        input_width, input_height = predictor.input_size
        assert input_width % 16 == 0 and input_height % 16 == 0 and min(predictor.input_size) == SIZE
    assert predictor.input_size == (3 * SIZE, SIZE)  # 20:1 is capped at 3:1


def test_square_mode_squashes_and_still_returns_the_original_size(model):
    image = random_image(90, 60)
    square = Predictor(model, image_size=SIZE, square=True)
    square.set_image(image)
    probs = square.predict(phrases=PHRASES[:1])
    assert square.input_size == (SIZE, SIZE) and probs.shape == (1, 60, 90)
    expected = reference_probs(model, normalised(image, (SIZE, SIZE)), image.size, phrases=PHRASES[:1])
    assert np.abs(probs[0] - expected).max() <= 1e-5


def test_grayscale_rgba_and_exif_rotated_inputs(predictor, tmp_path):
    gray = random_image(70, 50, mode="L")
    gray.save(tmp_path / "gray.png")
    rgba = random_image(70, 50, mode="RGBA")
    rgba.save(tmp_path / "rgba.png")
    stored = random_image(70, 50, seed=5)  # stored 70x50, EXIF says rotate 90 degrees: upright 50x70
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    on_black = Image.new("RGB", rgba.size)
    on_black.paste(rgba, mask=rgba.getchannel("A"))
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB")

    cases = [("gray.png", gray.convert("RGB")), ("rgba.png", on_black), ("rotated.jpg", upright)]
    for name, equivalent_rgb in cases:
        predictor.set_image(tmp_path / name)
        from_file = predictor.predict(phrases=PHRASES[:1])
        predictor.set_image(equivalent_rgb)
        assert from_file.shape == (1, equivalent_rgb.height, equivalent_rgb.width), name
        assert np.abs(from_file - predictor.predict(phrases=PHRASES[:1])).max() <= 1e-6, name
    assert upright.size == (50, 70)


def test_array_inputs_and_their_errors(predictor):
    array = np.asarray(random_image(48, 40))
    predictor.set_image(array)
    from_uint8 = predictor.predict(phrases=PHRASES[:1])
    predictor.set_image(array.astype(np.float32) / 255)
    assert np.abs(predictor.predict(phrases=PHRASES[:1]) - from_uint8).max() <= 1e-6
    predictor.set_image(array[..., 0])
    assert predictor.predict(phrases=PHRASES[:1]).shape == (1, 40, 48)
    with pytest.raises(ValueError, match="channels last"):
        predictor.set_image(array.transpose(2, 0, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor.set_image(array.astype(np.float32))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        predictor.set_image(42)


def test_predict_needs_an_image_and_a_prompt(model):
    fresh = Predictor(model, image_size=SIZE)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(phrases=["a"])
    fresh.set_image(random_image(32, 32))
    with pytest.raises(ValueError, match="no prompt"):
        fresh.predict()
    with pytest.raises(TypeError, match="list of strings"):
        fresh.predict(phrases="a cat")
    with pytest.raises(ValueError, match="multiple of the patch size 16 of .*use 48 or 64"):
        Predictor(model, image_size=50)


def test_support_mask_of_another_size_is_an_error(predictor, tmp_path):
    support, _ = write_support(tmp_path)
    predictor.set_image(random_image(32, 32))
    with pytest.raises(ValueError, match="support image's size"):
        predictor.predict(support=[(support, np.ones((10, 10), dtype=bool))])


def test_batched_images_equal_one_at_a_time(predictor):
    images = [random_image(80, 50, seed=1), random_image(64, 40, seed=2), random_image(50, 90, seed=3)]
    batched = predictor.predict_batch(images, phrases=PHRASES, batch_size=2)  # first two share the 96x64 input
    for image, probs in zip(images, batched):
        predictor.set_image(image)
        assert probs.shape == (len(PHRASES), image.height, image.width)
        assert np.abs(probs - predictor.predict(phrases=PHRASES)).max() <= 1e-5


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_is_bf16_only_where_the_cpu_has_it(model, monkeypatch, native_bf16):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native_bf16)
    image = random_image(80, 50)
    full, mixed = Predictor(model, image_size=SIZE), Predictor(model, image_size=SIZE, amp=True)
    full.set_image(image)
    mixed.set_image(image)
    reference, approximate = full.predict(phrases=PHRASES), mixed.predict(phrases=PHRASES)
    assert approximate.dtype == np.float32 and approximate.shape == reference.shape
    if native_bf16:
        assert 0 < np.abs(approximate - reference).max() < 0.05  # bf16 really ran, and stayed close
    else:
        assert np.array_equal(approximate, reference)  # emulated bf16 would only be slower: fp32


# -------------------------------------------------------------------------------------------- file names


def test_output_names_are_safe_and_distinct():
    names = [name for name in image_output_names([Path(f"{p}.jpg") for p in NASTY_PROMPTS])]
    assert len(set(names)) == len(names) and all("/" not in name and name not in (".", "..") for name in names)
    assert image_output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])[2] == "y"
    first, second, _ = image_output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])
    assert first != second and first.startswith("a-x-jpg~") and second.startswith("b-x-jpg~")


# --------------------------------------------------------------------------------------------------- CLI


def run_cli(tiny_dir, inputs, out, *extra) -> int:
    args = [*map(str, inputs), "--model", str(tiny_dir), "--image-size", str(SIZE), "--out", str(out)]
    return main([*args, "--precision", "fp32", *extra])  # compared with Predictor results, fp32 by default


def test_cli_writes_maps_masks_overlays_and_summary(tiny_dir, model, tmp_path):
    image_path = tmp_path / "photo.jpg"
    random_image(90, 60).save(image_path, quality=95)
    support, mask = write_support(tmp_path)
    out = tmp_path / "out"
    args = ["--prompt", PHRASES[0], "--prompt", PHRASES[1], "--visual-prompt", f"{support}:{mask}"]
    assert run_cli(tiny_dir, [image_path], out, *args, "--prob-bits", "16", "--threshold", "0.5") == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == 1 and summary["skipped"] == 0 and summary["errors"] == []
    (entry,) = summary["images"]
    assert (entry["width"], entry["height"], entry["inference_size"]) == (90, 60, [96, 64])
    assert [p["prompt"] for p in entry["prompts"]] == [*PHRASES[:2], "visual: support.png"]
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(image_path)
    expected = predictor.predict(phrases=PHRASES[:2], support=[(support, mask)])
    for prompt, probs in zip(entry["prompts"], expected):
        prob_png = Image.open(prompt["files"]["probability"])
        assert prob_png.mode == "I;16" and prob_png.size == (90, 60)
        assert np.abs(np.asarray(prob_png) / 65535 - probs).max() <= 1e-4
        mask_png = np.asarray(Image.open(prompt["files"]["mask"]))
        assert set(np.unique(mask_png)) <= {0, 255}
        np.testing.assert_array_equal(mask_png == 255, probs > 0.5)
        assert prompt["area_fraction"] == pytest.approx((probs > 0.5).mean(), abs=1e-6)
        assert prompt["max_probability"] == pytest.approx(probs.max(), abs=1e-6)
        assert Image.open(prompt["files"]["overlay"]).size == (90, 60)
    assert Image.open(entry["overlay"]).size == (90, 60) and Path(entry["overlay"]).name == "overlay.png"
    assert len(list((out / "photo").iterdir())) == 3 * 3 + 1


def test_cli_summary_to_stdout_and_8_bit_maps(tiny_dir, tmp_path, capsys):
    random_image(40, 40).save(tmp_path / "img.png")
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky", "--summary", "-") == 0
    summary = json.loads(capsys.readouterr().out)
    (prompt,) = summary["images"][0]["prompts"]
    assert Image.open(prompt["files"]["probability"]).mode == "L"
    assert summary["images"][0]["overlay"] == prompt["files"]["overlay"]  # one prompt: its overlay is the overlay
    assert not (tmp_path / "out" / "summary.json").exists()


def test_cli_folder_of_mixed_sizes_with_unreadable_files(tiny_dir, model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = {"a.jpg": (80, 50), "b.png": (64, 40), "c.png": (50, 90), "d.jpg": (31, 17)}
    for name, size in sizes.items():
        random_image(*size, seed=len(name) + size[0]).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    assert run_cli(tiny_dir, [folder, tmp_path / "missing.jpg"], out, "--prompt", "sky", "--batch-size", "3") == 0

    summary = json.loads((out / "summary.json").read_text())
    assert [Path(e["image"]).name for e in summary["images"]] == sorted(sizes)
    errors = {Path(e["image"]).name: e["error"] for e in summary["errors"]}
    assert set(errors) == {"missing.jpg", "broken.jpg", "empty.png"}
    assert errors["missing.jpg"] == "file not found" and errors["empty.png"] == "empty file"
    assert errors["broken.jpg"].startswith("cannot decode")
    assert summary["processed"] == 4 and summary["skipped"] == 3
    stderr = capsys.readouterr().err
    assert "broken.jpg" in stderr and "empty.png" in stderr and "missing.jpg" in stderr
    predictor = Predictor(model, image_size=SIZE)
    for entry in summary["images"]:
        probs = np.asarray(Image.open(entry["prompts"][0]["files"]["probability"])) / 255
        assert probs.shape == (entry["height"], entry["width"]) == sizes[Path(entry["image"]).name][::-1]
        predictor.set_image(entry["image"])
        assert np.abs(probs - predictor.predict(phrases=["sky"])[0]).max() <= 1 / 255


def test_cli_with_nothing_readable_exits_non_zero(tiny_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    assert run_cli(tiny_dir, [tmp_path / "broken.png"], tmp_path / "out", "--prompt", "sky") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processed"] == 0 and summary["errors"][0]["image"].endswith("broken.png")


def test_cli_output_names_stay_inside_out_for_any_prompt(tiny_dir, tmp_path):
    random_image(40, 30).save(tmp_path / "img.png")
    out = tmp_path / "deep" / "out"
    prompt_args = [arg for prompt in NASTY_PROMPTS for arg in ("--prompt", prompt)]
    with pytest.warns(UserWarning, match="truncated"):  # the 500-character prompt exceeds CLIP's 77 tokens
        assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *prompt_args) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written if p.name != "img.png")
    assert len(list((out / "img").glob("*.prob.png"))) == len(NASTY_PROMPTS)
    summary = json.loads((out / "summary.json").read_text())
    assert [p["prompt"] for p in summary["images"][0]["prompts"]] == NASTY_PROMPTS


def test_cli_argument_errors(tiny_dir, tmp_path, capsys):
    random_image(32, 32).save(tmp_path / "img.png")
    for bad, message in [
        ([], "at least one --prompt"),
        (["--visual-prompt", f"{tmp_path / 'img.png'}:{tmp_path / 'nope.png'}"], "SUPPORT_IMAGE:MASK_IMAGE"),
        (["--prompt", "a", "--threshold", "1.5"], "threshold"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "img.png"), "--model", str(tiny_dir), *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    Image.fromarray(np.ones((5, 5), dtype=np.uint8) * 255).save(tmp_path / "small_mask.png")
    spec = f"{tmp_path / 'img.png'}:{tmp_path / 'small_mask.png'}"
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--visual-prompt", spec) == 2
    assert "support image's size" in capsys.readouterr().err
    assert run_cli(tmp_path / "no_model", [tmp_path / "img.png"], tmp_path / "out", "--prompt", "a") == 2
    assert "cannot load --model" in capsys.readouterr().err
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "a", "--image-size", "50") == 2
    assert "image size 50 is not a multiple of the patch size 16 of tiny: use 48 or 64" in capsys.readouterr().err


def test_overlay_blends_each_mask_in_its_colour_with_a_legend():
    image = Image.new("RGB", (200, 120), (0, 0, 0))
    first, second = np.zeros((120, 200), dtype=bool), np.zeros((120, 200), dtype=bool)
    first[60:, :100] = True
    second[60:, 100:] = True
    overlay = np.asarray(draw_overlay(image, [first, second], ["cat", "sofa"]))
    np.testing.assert_array_equal(overlay[100, 50], np.round(0.5 * np.array(PALETTE[0])))
    np.testing.assert_array_equal(overlay[100, 150], np.round(0.5 * np.array(PALETTE[1])))
    np.testing.assert_array_equal(overlay[60, 50], PALETTE[0])  # solid contour on the mask's border ...
    np.testing.assert_array_equal(overlay[119, 50], np.round(0.5 * np.array(PALETTE[0])))  # ... not the image's
    assert not overlay[40:60, 120:].any()  # unmasked and away from the legend: untouched
    legend = overlay[:30, :60]
    assert (legend == 255).all(axis=-1).any()  # white label text
    assert (legend == np.array(PALETTE[0])).all(axis=-1).any() and (legend == np.array(PALETTE[1])).all(axis=-1).any()


def test_in_memory_sixteen_bit_and_transparent_images_become_rgb():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[0, :, 0], [0, 128, 255])  # scaled, not clipped
    half_transparent = Image.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(load_image(half_transparent))[0], [[0, 0, 0], [200, 100, 50]])


def strict_json(text: str) -> dict:
    """`text` parsed by a strict JSON parser (NaN and Infinity are not JSON)."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_cli_a_model_whose_output_overflows_stops_with_a_message_and_a_strict_summary(
    overflowing_checkpoint, tmp_path, capsys
):
    random_image(40, 30).save(tmp_path / "img.png")
    out = tmp_path / "out"
    assert run_cli(overflowing_checkpoint, [tmp_path / "img.png"], out, "--prompt", "sky") == 2
    assert "error: stopped after 0 image(s): the model's output holds" in capsys.readouterr().err
    summary = strict_json((out / "summary.json").read_text())
    assert summary["processed"] == 0 and summary["stopped"].startswith("stopped after 0 image(s)")
    assert not list(out.rglob("*.png"))  # no empty masks passed off as results


def test_cli_summary_files_are_strict_json(tiny_dir, tmp_path, capsys):
    random_image(40, 30).save(tmp_path / "img.png")
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky") == 0
    summary = strict_json((tmp_path / "out" / "summary.json").read_text())
    assert 0 < summary["images"][0]["prompts"][0]["max_probability"] < 1
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky", "--summary", "-") == 0
    assert strict_json(capsys.readouterr().out)["processed"] == 1


def test_cli_duplicate_prompts_are_segmented_once_with_a_note(tiny_dir, tmp_path, capsys):
    random_image(40, 30).save(tmp_path / "img.png")
    out = tmp_path / "out"
    prompts = ["--prompt", "sky", "--prompt", "a dog", "--prompt", "sky", "--prompt", "sky"]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *prompts) == 0
    assert "note: prompt 'sky' given 3 times: segmented once" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [p["prompt"] for p in summary["images"][0]["prompts"]] == ["sky", "a dog"]
    assert summary["merged_prompts"] == [{"prompt": "sky", "times": 3}]
    assert len(list((out / "img").glob("*.prob.png"))) == 2


def test_ten_thousand_distinct_prompts_keep_distinct_safe_files():
    phrases = [f"thing {i}" for i in range(10_000)] + ["../../x", "thing 7"]
    prompts, merged = merge_duplicates(build_prompts(phrases, []))
    assert [p.text for p in prompts] == phrases[:-1] and merged == [{"prompt": "thing 7", "times": 2}]
    assert len({p.slug for p in prompts}) == len(prompts) and all(is_safe_name(p.slug) for p in prompts)


def test_cli_unreadable_folder_entries_and_decompression_bombs_are_counted_skips(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "photos"
    folder.mkdir()
    random_image(40, 30).save(folder / "good.png")
    random_image(300, 300).save(folder / "bomb.png")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # a symlink loop
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a broken link
    (folder / "album.jpg").mkdir()  # a folder named like an image
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50_000)
    out = tmp_path / "out"
    assert run_cli(tiny_dir, [folder, folder / "loop.jpg"], out, "--prompt", "sky") == 0
    summary = json.loads((out / "summary.json").read_text())
    errors = {Path(e["image"]).name: e["error"] for e in summary["errors"]}
    assert errors == {
        "loop.jpg": "cannot read (Too many levels of symbolic links)",
        "gone.jpg": "broken symbolic link",
        "album.jpg": "not a regular file",
        "bomb.png": "too large (300x300 > 50000 pixels)",
    }
    assert [e["image"] for e in summary["errors"]].count(str(folder / "loop.jpg")) == 2  # listed and given
    assert summary["processed"] == 1 and summary["skipped"] == 5
    assert "loop.jpg: cannot read" in capsys.readouterr().err


def test_cli_unwritable_outputs_stop_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the outputs cannot be written")

    monkeypatch.setattr(CLIPSeg, "from_pretrained", no_loading)
    random_image(40, 30).save(tmp_path / "img.png")
    (tmp_path / "a_file").write_text("in the way")
    for flags in (["--out", str(tmp_path / "a_file")], ["--summary", str(tmp_path / "a_file" / "summary.json")]):
        assert main([str(tmp_path / "img.png"), "--prompt", "sky", *flags]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err


def test_cli_a_summary_that_cannot_be_written_is_printed_instead(tiny_dir, tmp_path, capsys, monkeypatch):
    random_image(40, 30).save(tmp_path / "img.png")

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(predict, "write_text", disk_full)
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky") == 1
    captured = capsys.readouterr()
    assert "error: cannot write the summary" in captured.err and "No space left on device" in captured.err
    assert strict_json(captured.out)["images"][0]["prompts"][0]["prompt"] == "sky"
