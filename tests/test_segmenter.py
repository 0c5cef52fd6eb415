"""clipseg.segmenter: the web page's logic without Gradio (Segmenter) on a tiny saved model: overlays, heatmaps and
zips of masks equal to the Predictor's, the image encoded once per session, image prompts painted or uploaded, bad
and hostile input as messages, and sessions and caches that stay bounded."""

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import box_mask, huge_png, read_zip, save, scene, vision_tower_calls
from PIL import Image

import clipseg.segmenter
from clipseg.outputs import is_safe_name
from clipseg.predictor import Predictor
from clipseg.segmenter import Segmenter
from clipseg.sessions import MB, retained_bytes
from clipseg.uploads import painted_mask, parse_prompts
from model import CLIPSeg


@pytest.fixture
def segmenter(demo_model, tmp_path):
    return Segmenter(demo_model, "tiny", workdir=tmp_path)


# ------------------------------------------------------------------------------------------- the logic


def test_prompts_split_on_lines_and_commas_keep_order_and_drop_repeats():
    assert parse_prompts("a cat, the sofa\n\n  sky  \n a cat,") == ["a cat", "the sofa", "sky"]
    assert parse_prompts("  ,\n ") == [] and parse_prompts(None) == []


def test_two_prompts_give_overlay_heatmaps_and_a_zip_of_original_size_masks(demo_model, segmenter, tmp_path):
    image = save(scene(203, 151), tmp_path / "room.png")
    session, out = segmenter.segment(None, str(image), "red disc\nblue square", threshold=0.4)

    assert out.ok, out.message
    assert out.overlay.size == (203, 151)  # small images are previewed at their size
    assert [caption.split(" (")[0] for _, caption in out.heatmaps] == ["red disc", "blue square"]
    masks, summary = read_zip(out.zip_path)
    assert len(masks) == 2 and all(m.size == (203, 151) and m.mode == "L" for m in masks.values())
    predictor = Predictor(demo_model)
    predictor.set_image(str(image))
    probs = predictor.predict(phrases=["red disc", "blue square"])
    for entry, prob in zip(summary["images"][0]["prompts"], probs):
        mask = np.asarray(masks[entry["files"]["mask"]])
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, prob > 0.4)  # the CLI's masks, to the pixel
        assert entry["area_fraction"] == pytest.approx((prob > 0.4).mean(), abs=1e-6)
        assert entry["max_probability"] == pytest.approx(prob.max(), abs=1e-6)
    assert 0 < (probs > 0.4).mean() < 1  # a mask that is neither empty nor everything
    assert summary["threshold"] == {"value": 0.4, "source": "given", "note": "threshold 0.4 (given)"}
    assert summary["square"] is False and summary["processed"] == 1
    assert summary["images"][0] | {"prompts": None} == {
        "image": "room.png",
        "width": 203,
        "height": 151,
        "inference_size": [80, 64],
        "prompts": None,
    }
    assert "read + encode image" in out.message and "decode" in out.message


def test_prompt_changes_reuse_the_encoded_image_and_threshold_changes_run_no_model(demo_model, segmenter, tmp_path):
    image = save(scene(120, 90), tmp_path / "a.png")
    with vision_tower_calls(demo_model) as calls:
        session, out = segmenter.segment(None, str(image), "red disc")
        assert calls == {"vision": 1, "decoder": 1}
        session, out = segmenter.segment(session, str(image), "blue square, sky")
        assert calls == {"vision": 1, "decoder": 2} and "read + encode image cached" in out.message
        before, old_zip = out.summary["images"][0]["prompts"][0]["area_fraction"], Path(out.zip_path)
        session, out = segmenter.rethreshold(session, 0.9)
        assert calls == {"vision": 1, "decoder": 2} and out.ok
        assert Path(out.zip_path).is_file() and not old_zip.exists()  # a session keeps one zip on disk
        assert out.summary["images"][0]["prompts"][0]["area_fraction"] < before
        assert out.summary["threshold"]["value"] == 0.9 and "Re-thresholded at 0.90" in out.message
        session, out = segmenter.segment(session, str(image), "sky", geometry=segmenter.square_label)
        assert calls["vision"] == 2 and out.summary["images"][0]["inference_size"] == [64, 64]
        session, out = segmenter.segment(session, str(save(scene(120, 90, seed=1), tmp_path / "b.png")), "sky")
        assert calls["vision"] == 3
        other, out = segmenter.segment(None, str(image), "sky")  # another session encodes its own image
        assert calls["vision"] == 4
    segmenter.forget(other)  # when a closed tab's state expires
    assert not Path(out.zip_path).exists()


def test_image_prompt_with_an_uploaded_mask_equals_the_predictors_support_prompt(demo_model, segmenter, tmp_path):
    image = save(scene(160, 120), tmp_path / "query.png")
    support = save(scene(100, 80, seed=3), tmp_path / "support.png")
    mask = save(box_mask(100, 80, (10, 20, 50, 70)), tmp_path / "mask.png")
    with vision_tower_calls(demo_model) as calls:
        session, out = segmenter.segment(None, str(image), "red disc", support=str(support), support_mask=str(mask))
        assert calls["vision"] == 2  # the image and the support
        session, out = segmenter.segment(session, str(image), "sky", support=str(support), support_mask=str(mask))
        assert calls["vision"] == 2  # neither is encoded again

    assert out.ok, out.message
    entries = out.summary["images"][0]["prompts"]
    assert [(e["prompt"], e["kind"]) for e in entries] == [("sky", "text"), ("visual: support.png", "visual")]
    predictor = Predictor(demo_model)
    predictor.set_image(str(image))
    expected = predictor.predict(support=[(support, mask)])[0]
    np.testing.assert_allclose(session.result.probabilities(index=1), expected, atol=1e-5)
    masks, _ = read_zip(out.zip_path)
    assert np.asarray(masks[entries[1]["files"]["mask"]]).shape == (120, 160)


def test_strokes_painted_on_the_support_image_are_its_mask(segmenter, tmp_path):
    image = save(scene(160, 120), tmp_path / "query.png")
    support = save(scene(100, 80, seed=3), tmp_path / "support.png")
    layer = np.zeros((80, 100, 4), dtype=np.uint8)
    layer[20:70, 10:50] = (255, 48, 48, 255)  # the brush's colour, opaque
    layer_path = save(Image.fromarray(layer, "RGBA"), tmp_path / "layer_0.png")
    mask = save(box_mask(100, 80, (10, 20, 50, 70)), tmp_path / "mask.png")

    editor = {
        "background": {"path": str(support), "orig_name": "background.png"},
        "layers": [{"path": str(layer_path)}],
    }
    painted_session, painted = segmenter.segment(None, str(image), "", support=editor)
    uploaded_session, uploaded = segmenter.segment(None, str(image), "", support=str(support), support_mask=str(mask))

    assert painted.ok, painted.message
    torch.testing.assert_close(painted_session.result.logits, uploaded_session.result.logits, rtol=0, atol=0)
    assert painted_mask([{"path": str(layer_path)}], (200, 160)).shape == (160, 200)  # a scaled canvas


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_inputs_get_a_message_not_an_exception(segmenter, tmp_path):
    image = str(save(scene(64, 48), tmp_path / "ok.png"))
    support = str(save(scene(100, 80, seed=3), tmp_path / "support.png"))
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    cases = {
        "Upload, paste or photograph an image first": dict(image=None, prompts_text="cat"),
        "'broken.jpg' cannot be used: cannot decode": dict(image=str(tmp_path / "broken.jpg"), prompts_text="cat"),
        "cannot be used: too large (9000x9000": dict(image=str(huge_png(tmp_path / "huge.png")), prompts_text="cat"),
        "Enter at least one text prompt": dict(image=image, prompts_text=" , \n"),
        "21 prompts given; at most 20": dict(image=image, prompts_text=",".join(f"thing {i}" for i in range(21))),
        "is 30x30 but the support image is 100x80": dict(
            image=image,
            prompts_text="",
            support=support,
            support_mask=str(save(box_mask(30, 30, (0, 0, 10, 10)), tmp_path / "small.png")),
        ),
        "has a mask but no support image": dict(image=image, prompts_text="", support_mask=support),
        "The image prompt has no object": dict(image=image, prompts_text="", support={"background": support}),
        "The threshold must be in [0, 1)": dict(image=image, prompts_text="cat", threshold=1.5),
    }
    session = None
    for expected, inputs in cases.items():
        session, out = segmenter.segment(session, **inputs)
        assert not out.ok and out.message.startswith("**Error:**") and expected in out.message, out.message
        assert out.zip_path is None and not out.heatmaps
    session, out = segmenter.rethreshold(session, 0.5)
    assert not out.ok and "Segment an image first" in out.message


def test_a_model_whose_outputs_overflow_gets_a_message_not_a_traceback(overflowing_checkpoint, tmp_path, capsys):
    segmenter = Segmenter(CLIPSeg.from_pretrained(overflowing_checkpoint), "overflowing", workdir=tmp_path)
    session, out = segmenter.segment(None, str(save(scene(64, 48), tmp_path / "ok.png")), "cat")
    assert not out.ok and out.zip_path is None and "NaN or infinite" in out.message, out.message
    assert "Traceback" not in capsys.readouterr().err and session.result is None


def test_prompts_over_the_limits_are_refused_at_once_naming_the_limit(demo_model, segmenter, tmp_path):
    image = str(save(scene(64, 48), tmp_path / "ok.png"))
    cases = {
        "The prompts are 2,000,000 characters long; at most 20,020 (20 prompts of at most 1,000 characters)": (
            "cat " * 500_000
        ),
        "is 1,199 characters long; a prompt has at most 1,000 characters (CLIP reads at most 77 tokens)": "x " * 600,
        "has a word of 600 characters; a word has at most 500 characters": "a " + "y" * 600,
    }
    started = time.perf_counter()
    with vision_tower_calls(demo_model) as calls:
        for expected, text in cases.items():
            _, out = segmenter.segment(None, image, text)
            assert not out.ok and out.message.startswith("**Error:**") and expected in out.message, out.message
    assert calls == {} and time.perf_counter() - started < 2  # refused before any model work


def test_hostile_prompts_get_safe_names_in_the_zip(segmenter, tmp_path):
    prompts = ["../../etc/passwd", "/", "..", "a\x00b", "CON", "a/b\\c:d*e?", "猫 on the mat", "x" * 500]
    with pytest.warns(UserWarning, match="truncated"):  # the 500-character prompt exceeds CLIP's 77 tokens
        _, out = segmenter.segment(None, str(save(scene(64, 48), tmp_path / "ok.png")), "\n".join(prompts))
    assert out.ok, out.message
    with zipfile.ZipFile(out.zip_path) as archive:
        names = archive.namelist()
    stems = [name.removesuffix(".mask.png") for name in names if name != "summary.json"]
    assert len(set(stems)) == len(prompts) and all(is_safe_name(stem) for stem in stems), names


def test_the_phrase_cache_stays_bounded(demo_model, tmp_path, monkeypatch):
    monkeypatch.setattr(clipseg.segmenter, "MAX_CACHED_PHRASES", 5)
    segmenter = Segmenter(demo_model, "tiny", workdir=tmp_path)
    image = str(save(scene(80, 60), tmp_path / "a.png"))
    for phrases in (["red", "blue"], ["green", "sky", "sun"], ["red", "moon"]):  # "red" is cached, least recently used
        session, out = segmenter.segment(None, image, ", ".join(phrases))
        assert out.ok, out.message
        assert len(demo_model.text_cache) <= 5
    assert set(demo_model.text_cache) == {"green", "sky", "sun", "red", "moon"}
    predictor = Predictor(demo_model)
    predictor.set_image(image)
    expected = predictor.predict(phrases=["red", "moon"])
    np.testing.assert_allclose(session.result.probabilities(), expected, atol=1e-6)


@pytest.mark.slow
def test_a_session_keeps_under_64_mb_with_a_4096_image_and_20_prompts(tiny_checkpoint, tmp_path):
    model = CLIPSeg.from_pretrained(tiny_checkpoint("at352", image_size=352)).eval()  # the released models' size
    pixels = np.zeros((4096, 4096, 3), dtype=np.uint8)
    pixels[:, :2048] = (220, 30, 30)
    pixels[1000:3000, 2500:3500] = (30, 60, 220)
    path = save(Image.fromarray(pixels), tmp_path / "big.png")
    segmenter = Segmenter(model, "tiny", workdir=tmp_path)
    session, out = segmenter.segment(None, str(path), "\n".join(f"thing {i}" for i in range(20)))
    assert out.ok, out.message
    held = retained_bytes(session)  # the image's features, a preview and the logits; README: about 50 MB at most
    assert held < 64 * MB, f"{held / MB:.0f} MB"
    with zipfile.ZipFile(out.zip_path) as archive:
        masks = [name for name in archive.namelist() if name.endswith(".png")]
        assert len(masks) == 20 and Image.open(archive.open(masks[-1])).size == (4096, 4096)


def test_the_least_recently_used_session_is_dropped_when_all_hold_too_much(demo_model, tmp_path):
    segmenter = Segmenter(demo_model, "tiny", workdir=tmp_path, memory_mb=0.25)
    image = str(save(scene(203, 151), tmp_path / "room.png"))
    first, out = segmenter.segment(None, image, "red disc")
    assert out.ok and 0.125 * MB < retained_bytes(first) <= 0.25 * MB  # one page fits, two do not
    second, out = segmenter.segment(None, image, "sky")
    assert out.ok and second.result is not None and first.result is None and first.encoded is None
    assert segmenter.sessions.total_bytes <= 0.25 * MB and len(segmenter.sessions) == 1
    first, out = segmenter.rethreshold(first, 0.5)
    assert not out.ok and "dropped because the server keeps at most 0.25 MB of results for all pages" in out.message
    assert "Press Segment to compute it again" in out.message
    first, out = segmenter.segment(first, image, "red disc")
    assert out.ok and "earlier image and result had been dropped" in out.message
    assert second.result is None and second.dropped is not None  # now the second was the least recently used


def test_a_session_unused_for_the_idle_time_is_dropped(demo_model, tmp_path):
    now = [0.0]
    segmenter = Segmenter(demo_model, "tiny", workdir=tmp_path, idle_minutes=10, clock=lambda: now[0])
    image = str(save(scene(80, 60), tmp_path / "a.png"))
    idle, _ = segmenter.segment(None, image, "red disc")
    zip_dir = idle.zip_dir
    now[0] += 9 * 60
    busy, _ = segmenter.segment(None, image, "sky")
    assert idle.result is not None
    now[0] += 2 * 60
    busy, out = segmenter.rethreshold(busy, 0.4)  # any request drops what was idle too long
    assert out.ok and idle.result is None and idle.encoded is None and not zip_dir.exists()
    _, out = segmenter.rethreshold(idle, 0.5)
    assert not out.ok and "dropped because it was not used for 10 minutes" in out.message


def test_a_closed_page_is_freed_without_waiting_for_a_running_segmentation(segmenter, tmp_path):
    import threading

    session, _ = segmenter.segment(None, str(save(scene(80, 60), tmp_path / "a.png")), "sky")
    zip_dir = session.zip_dir
    with segmenter._lock:  # as while another page is segmented; Gradio calls forget from its event loop
        closing = threading.Thread(target=segmenter.forget, args=(session,))
        closing.start()
        closing.join(timeout=5)
        assert not closing.is_alive()
    assert session.result is None and not zip_dir.exists() and len(segmenter.sessions) == 0


# ------------------------------------------------------------------------------------------- mask controls


def test_expressions_and_mask_controls_give_the_predictors_masks(demo_model, segmenter, tmp_path):
    from clipseg.postprocess import MaskOptions
    from clipseg.segmenter import Controls

    image = scene(150, 110)
    path = save(image, tmp_path / "room.png")
    controls = Controls(grow=2.0, fill_holes=True, min_area=4.0, instances=True, max_instances=2)
    with vision_tower_calls(demo_model) as calls:
        session, out = segmenter.segment(None, str(path), "red disc | blue square - sky\ngrass, sky", controls=controls)
        assert calls["vision"] == 1, "all phrases of all expressions from one encoding"
    assert out.ok, out.message
    masks, summary = read_zip(out.zip_path)
    entries = summary["images"][0]["prompts"]
    assert [e["prompt"] for e in entries] == ["red disc | blue square - sky", "grass", "sky"]
    assert entries[0]["expression"]["phrases"] == ["red disc", "blue square", "sky"]
    assert summary["threshold"] == {"value": 0.3, "source": "paper", "note": segmenter.threshold_note}  # as predict.py
    assert summary["pipeline"]["mask"]["grow"] == 2 and summary["pipeline"]["mask"]["max_instances"] == 2
    predictor = Predictor(demo_model)
    predictor.set_image(image)
    options = MaskOptions(grow=2, fill_holes=True, min_area=4, instances=True, max_instances=2)
    expected = predictor.predict_masks(["red disc | blue square - sky", "grass", "sky"], options=options)
    for entry, mask, instances in zip(entries, expected.masks, expected.instances):
        np.testing.assert_array_equal(np.asarray(masks[entry["files"]["mask"]]) > 0, mask)
        assert [i["area"] for i in entry["instances"]] == [i.area for i in instances]


def test_the_zip_holds_the_chosen_formats(segmenter, tmp_path):
    import json

    from pycocotools import mask as coco_mask

    from clipseg.segmenter import Controls

    path = save(scene(120, 90), tmp_path / "room.png")
    controls = Controls(feather=4, formats=("mask", "soft", "cutout", "coco"))
    session, out = segmenter.segment(None, str(path), "red disc", threshold=0.45, controls=controls)
    assert out.ok, out.message
    files = out.summary["images"][0]["prompts"][0]["files"]
    assert sorted(files) == ["cutout", "mask", "soft"]
    with zipfile.ZipFile(out.zip_path) as archive:
        assert sorted(archive.namelist()) == sorted([*files.values(), "coco.json", "summary.json"])
        mask = np.asarray(Image.open(archive.open(files["mask"]))) > 0
        soft = np.asarray(Image.open(archive.open(files["soft"])))
        cut = Image.open(archive.open(files["cutout"]))
        coco = json.loads(archive.read("coco.json"))
    assert cut.mode == "RGBA" and cut.size == (120, 90)
    np.testing.assert_array_equal(np.asarray(cut)[..., 3], soft)  # feathered: the soft mask is the alpha
    np.testing.assert_array_equal(np.asarray(cut)[..., :3], np.asarray(scene(120, 90)))
    assert ((soft > 127) == mask).all() and 0 < ((soft > 0) & (soft < 255)).sum()
    (annotation,) = coco["annotations"]
    np.testing.assert_array_equal(coco_mask.decode(annotation["segmentation"]).astype(bool), mask)
    assert coco["categories"][0]["name"] == "red disc"


def test_new_post_processing_needs_no_model_but_tiles_need_segment(demo_model, segmenter, tmp_path):
    from clipseg.segmenter import Controls

    path = save(scene(120, 90), tmp_path / "room.png")
    session, out = segmenter.segment(None, str(path), "red disc", threshold=0.4)
    name = out.summary["images"][0]["prompts"][0]["files"]["mask"]
    before = np.asarray(read_zip(out.zip_path)[0][name]) > 0
    with vision_tower_calls(demo_model) as calls:
        session, out = segmenter.rethreshold(session, 0.4, Controls(grow=3))
        assert calls == {} and out.ok, out.message
    after = np.asarray(read_zip(out.zip_path)[0][name]) > 0
    from scipy import ndimage

    disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
    np.testing.assert_array_equal(after, ndimage.binary_dilation(before, disk))
    session, out = segmenter.rethreshold(session, 0.4, Controls(tile=True))
    assert not out.ok and "press Segment" in out.message


def test_tiles_in_the_app_equal_the_predictors_tiles(demo_model, segmenter, tmp_path):
    from clipseg.segmenter import Controls

    image = scene(200, 150, seed=2)
    path = save(image, tmp_path / "big.png")
    session, out = segmenter.segment(None, str(path), "red disc | sky", controls=Controls(tile=True))
    assert out.ok, out.message and out.summary["pipeline"]["tile"] == 64
    predictor = Predictor(demo_model)
    predictor.set_image(image)
    expected = predictor.predict_masks(["red disc | sky"], tile=64)
    name = out.summary["images"][0]["prompts"][0]["files"]["mask"]
    np.testing.assert_array_equal(np.asarray(read_zip(out.zip_path)[0][name]) > 0, expected.masks[0])


def test_the_mask_controls_are_mask_options_fields_and_give_them_typed():
    from dataclasses import fields

    from clipseg.postprocess import MaskOptions
    from clipseg.segmenter import MASK_CONTROLS, Controls

    assert list(MASK_CONTROLS) == [f.name for f in fields(MaskOptions) if f.name != "threshold"]
    assert [f.name for f in fields(Controls)][: len(MASK_CONTROLS)] == list(MASK_CONTROLS)
    widgets = Controls(grow=2.0, shrink=1.0, feather=3, fill_holes=1, min_area=5.0, instances=0, sort_by="score",
                       max_instances=0.0)  # fmt: skip
    options = widgets.mask_options(0.25)
    assert options == MaskOptions(0.25, 2, 1, 3.0, True, 5, False, "score", None)
    assert type(options.grow) is int and type(options.feather) is float
    with pytest.raises(ValueError, match="grow must be a whole number of pixels from 0 to 100000, got 1.5"):
        Controls(grow=1.5).mask_options(0.3)
    with pytest.raises(ValueError, match="fill_holes must be true or false, got 'no'"):
        Controls(fill_holes="no").mask_options(0.3)  # an API caller's text is not taken as True
    with pytest.raises(ValueError, match="feather must be a width in pixels from 0 to 100000, got '3'"):
        Controls(feather="3").mask_options(0.3)


def test_bad_mask_controls_get_a_message(segmenter, tmp_path):
    from clipseg.segmenter import Controls

    path = save(scene(80, 60), tmp_path / "a.png")
    cases = {
        "grow": Controls(grow=-1),
        "The zip's formats": Controls(formats=("gif",)),
        "The zip's formats must be some of": Controls(formats=None),
        "start the app with --sam-model": Controls(refine="sam"),
        "Refine must be one of": Controls(refine="sharpen"),
    }
    for expected, controls in cases.items():
        _, out = segmenter.segment(None, str(path), "sky", controls=controls)
        assert not out.ok and expected in out.message, out.message
    strip = tmp_path / "strip.png"
    Image.new("RGB", (200_000, 1), (90, 120, 200)).save(strip)  # windows of the model's 64 px: 4,167
    _, out = segmenter.segment(None, str(strip), "sky", controls=Controls(tile=True))
    assert not out.ok and "takes 4,167 windows (at most 4,096)" in out.message, out.message
    _, out = segmenter.segment(None, str(path), "sky | (grass")
    assert not out.ok and "Line 1 of the prompts" in out.message and "column" in out.message, out.message
