"""app.py's page in a real headless Chromium (Debian's `chromium`, driven by Playwright): text and image prompts,
the mask controls, bad inputs as a user meets them; and the README's screenshot. tests/test_app.py tests the command
line and the server as HTTP clients see it.

These tests need Gradio and Playwright (requirements-app.txt) and Debian's `chromium`; they skip locally when one is
missing, naming it, and fail under CI=true.

    python tests/test_app_browser.py --model checkpoints/demo --screenshot docs/app.png   # the README's screenshot
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import box_mask, huge_png, read_zip, require, save, scene, vision_tower_calls  # noqa: E402
from helpers import gradio_or_skip, serving  # noqa: E402

import app  # noqa: E402
from clipseg.loading import load_model  # noqa: E402
from clipseg.segmenter import Segmenter  # noqa: E402

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 90_000  # the slowest step (first segmentation on a loaded 2-core machine) takes a few seconds


# ---------------------------------------------------------------------------------------- in the browser


@contextmanager
def chromium_context(executable: str, profile: str):
    """A headless Chromium (Debian's, driven by Playwright) with a fresh profile and downloads allowed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("playwright", "pip install -r requirements-app.txt")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            args=BROWSER_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        try:
            yield context
        finally:
            context.close()


def open_page(context, url: str):
    """A new tab on the app; requests leaving 127.0.0.1 are blocked and listed in `tab.external_requests`."""
    tab = context.new_page()
    tab.external_requests = []

    def only_local(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            tab.external_requests.append(route.request.url)
            route.abort()

    tab.route("**/*", only_local)
    tab.goto(url)
    tab.wait_for_selector("#segment")
    return tab


def expect_text(tab, selector: str, text: str) -> str:
    """Wait until the element shows `text`; return its text."""
    from playwright.sync_api import expect

    expect(tab.locator(selector)).to_contain_text(text, timeout=WAIT_MS)
    return tab.inner_text(selector)


def segment(tab, expected: str) -> str:
    """Press Segment and wait for a status line containing `expected` (each step of a test expects new text)."""
    tab.click("#segment")
    return expect_text(tab, "#status", expected)


def upload(tab, selector: str, path: Path) -> None:
    tab.set_input_files(f"{selector} input[type=file]", str(path))


def upload_support(tab, path: Path) -> None:
    """Upload the support image into the editor and wait until it is drawn (the brush is then selected)."""
    from playwright.sync_api import expect

    tab.wait_for_selector("#support canvas")  # the editor is ready: an upload before this can be lost
    upload(tab, "#support", path)
    expect(tab.locator("#support")).not_to_contain_text("Upload an image", timeout=WAIT_MS)
    tab.wait_for_timeout(500)


def saved_zip(tab, tmp_path: Path) -> Path:
    """Download the zip the page offers, as a user clicking its link does; returns where it was saved."""
    with tab.expect_download() as info:
        tab.click("#download a[download]")
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    return path


def download_zip(tab, tmp_path: Path) -> tuple[dict[str, Image.Image], dict]:
    return read_zip(saved_zip(tab, tmp_path))


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    gradio_or_skip()
    with chromium_context(chromium, str(tmp_path_factory.mktemp("chromium-profile"))) as context:
        yield context


@pytest.fixture(scope="module")
def served(demo_model, browser, tmp_path_factory):
    segmenter = Segmenter(demo_model, "tiny", workdir=tmp_path_factory.mktemp("app"))
    with serving(segmenter) as url:
        yield url, segmenter


@pytest.mark.slow
def test_browser_two_text_prompts_give_overlay_heatmaps_and_masks(demo_model, served, browser, tmp_path):
    from playwright.sync_api import expect

    url, _ = served
    tab = open_page(browser, url)
    upload(tab, "#image", save(scene(203, 151), tmp_path / "room.png"))
    tab.fill("#prompts textarea", "red disc\nblue square")
    tab.wait_for_selector("#image img")
    with vision_tower_calls(demo_model) as calls:
        line = segment(tab, "2 prompt(s)")
        assert "read + encode image" in line and "decode" in line
        tab.wait_for_selector("#overlay img")
        assert tab.locator("#heatmaps img").count() == 2
        masks, summary = download_zip(tab, tmp_path)
        assert len(masks) == 2 and all(mask.size == (203, 151) for mask in masks.values())
        assert [p["prompt"] for p in summary["images"][0]["prompts"]] == ["red disc", "blue square"]
        tab.screenshot(path=str(tmp_path / "app.png"), full_page=True)

        tab.fill("#prompts textarea", "sky")  # a prompt-only change: the image is not encoded again
        assert "read + encode image cached" in segment(tab, "1 prompt(s)")
        assert tab.locator("#heatmaps img").count() == 1
        assert calls == {"vision": 1, "decoder": 2}
        tab.fill("#threshold input[type=number]", "0.8")  # a threshold change runs no model at all
        tab.press("#threshold input[type=number]", "Enter")
        assert "model not run" in expect_text(tab, "#status", "Re-thresholded at 0.80")
        assert calls == {"vision": 1, "decoder": 2}
        tab.click("#geometry label:has-text('square')")  # a new geometry re-encodes at once
        expect_text(tab, "#status", "the model sees 64x64")
        assert calls["vision"] == 2
    name, prompts = app.EXAMPLES[0]  # an example fills in the image and its prompts
    tab.click(f"text={prompts}")
    expect(tab.locator("#prompts textarea")).to_have_value(prompts, timeout=WAIT_MS)
    assert "3 prompt(s)" in segment(tab, name)
    assert Image.open(tmp_path / "app.png").size[0] >= 1000
    assert tab.external_requests == []  # nothing but the local server was asked for anything
    assert "Traceback" not in tab.content()


@pytest.mark.slow
def test_browser_image_prompt_painted_or_uploaded_gives_a_mask(served, browser, tmp_path, monkeypatch):
    url, segmenter = served
    received = []  # the image prompts the server built from what the page sent
    build = segmenter._image_prompt
    monkeypatch.setattr(segmenter, "_image_prompt", lambda *a: received.append(build(*a)) or received[-1])
    tab = open_page(browser, url)
    upload(tab, "#image", save(scene(160, 120), tmp_path / "query.png"))
    tab.click("text=Image prompt (optional)")
    upload_support(tab, save(scene(200, 160, seed=3), tmp_path / "support.png"))
    box = tab.locator("#support canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the support image is centred in the canvas
    tab.mouse.move(x - 15, y - 10)
    tab.mouse.down()
    tab.mouse.move(x + 15, y + 10, steps=8)
    tab.mouse.up()

    segment(tab, "1 prompt(s)")
    masks, summary = download_zip(tab, tmp_path)
    (entry,) = summary["images"][0]["prompts"]
    assert entry["kind"] == "visual" and list(masks) == [entry["files"]["mask"]]
    assert masks[entry["files"]["mask"]].size == (160, 120)
    painted = received[-1].mask  # the stroke arrived as mask pixels around the support image's centre
    assert painted.shape == (160, 200) and 0 < painted.mean() < 0.3
    rows, cols = np.nonzero(painted)
    assert abs(rows.mean() - 80) < 25 and abs(cols.mean() - 100) < 25

    upload(tab, "#support-mask", save(box_mask(200, 160, (20, 20, 90, 90)), tmp_path / "mask.png"))
    tab.wait_for_selector("#support-mask img")
    tab.fill("#prompts textarea", "red disc")
    segment(tab, "2 prompt(s)")
    masks, summary = download_zip(tab, tmp_path)
    assert [e["kind"] for e in summary["images"][0]["prompts"]] == ["text", "visual"] and len(masks) == 2
    assert received[-1].mask.sum() == 70 * 70  # the uploaded mask replaced the painted strokes
    assert tab.external_requests == []


def set_number(tab, selector: str, value, attempts: int = 3) -> None:
    """Type `value` into a slider's or number box's field and press Enter, as a user sets it; waits until the
    component holds it. Typed again when the page re-renders the field under the typing (an accordion's content
    just opened can reset a field to its default once, faster than a person types)."""
    from playwright.sync_api import expect

    field = tab.locator(f"{selector} input[type=number]")
    field.wait_for(state="visible", timeout=WAIT_MS)
    for attempt in range(attempts):
        field.fill(str(value))
        field.press("Enter")
        try:
            expect(field).to_have_value(str(value), timeout=WAIT_MS // attempts)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise


@pytest.mark.slow
def test_browser_mask_controls_give_the_pipelines_mask_and_the_chosen_files(demo_model, served, browser, tmp_path):
    """The "Mask" accordion set as a user would (grow 1, fill holes, instances keeping 1, cut-out and COCO in the
    zip, threshold 0.55): the zip holds those files, its mask is the library's pipeline's for the same options (each
    of which changes that mask), the summary records them; then grow 3 gives the library's grown mask."""
    from pycocotools import mask as coco_mask

    from clipseg.postprocess import MaskOptions
    from clipseg.predictor import Predictor

    url, _ = served
    image = scene(96, 80)
    tab = open_page(browser, url)
    upload(tab, "#image", save(image, tmp_path / "room.png"))
    tab.fill("#prompts textarea", "red disc")
    tab.wait_for_selector("#image img")
    set_number(tab, "#threshold", 0.55)
    expect_text(tab, "#status", "Segment an image first")  # the slider's own event, answered before going on
    tab.click("text=Mask: post-processing")
    set_number(tab, "#grow", 1)
    tab.check("#fill-holes input[type=checkbox]")
    tab.check("#instances input[type=checkbox]")
    set_number(tab, "#max-instances", 1)
    for name in ("cutout", "coco"):
        tab.check(f"#formats label:has-text('{name}') input[type=checkbox]")
    segment(tab, "1 prompt(s)")
    with zipfile.ZipFile(saved_zip(tab, tmp_path)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    summary = json.loads(files["summary.json"])
    (entry,) = summary["images"][0]["prompts"]
    assert sorted(files) == sorted(["coco.json", "summary.json", *entry["files"].values()])
    assert sorted(entry["files"]) == ["cutout", "mask"] and sorted(summary["formats"]) == ["coco", "cutout", "mask"]
    chosen = MaskOptions(0.55, grow=1, fill_holes=True, instances=True, max_instances=1)
    assert summary["pipeline"]["mask"] == chosen.to_dict() and summary["threshold"]["value"] == 0.55

    predictor = Predictor(demo_model)
    predictor.set_image(image)
    expected = predictor.predict_masks(["red disc"], 0.55, chosen).masks[0]
    mask = np.asarray(Image.open(io.BytesIO(files[entry["files"]["mask"]]))) > 0
    np.testing.assert_array_equal(mask, expected)
    for without in (dict(grow=0), dict(fill_holes=False), dict(instances=False, max_instances=None)):
        other = MaskOptions(**(chosen.to_dict() | without))  # each control the page set changes the mask
        assert not np.array_equal(predictor.predict_masks(["red disc"], 0.55, other).masks[0], expected), without
    assert [i["area"] for i in entry["instances"]] == [int(expected.sum())]
    cut = Image.open(io.BytesIO(files[entry["files"]["cutout"]]))
    assert cut.mode == "RGBA" and cut.size == (96, 80)
    np.testing.assert_array_equal(np.asarray(cut)[..., 3], np.where(expected, 255, 0))
    np.testing.assert_array_equal(np.asarray(cut)[..., :3], np.asarray(image))
    coco = json.loads(files["coco.json"])
    (annotation,) = coco["annotations"]  # instances: at most 1
    assert [c["name"] for c in coco["categories"]] == ["red disc"] and coco["images"][0]["width"] == 96
    np.testing.assert_array_equal(coco_mask.decode(annotation["segmentation"]).astype(bool), expected)

    set_number(tab, "#grow", 3)  # one control changed: a new result, the library's for the new options
    segment(tab, "read + encode image cached")
    masks, summary = download_zip(tab, tmp_path)
    grown = np.asarray(masks[entry["files"]["mask"]]) > 0
    assert summary["pipeline"]["mask"]["grow"] == 3 and not np.array_equal(grown, mask)
    expected = predictor.predict_masks(["red disc"], 0.55, MaskOptions(**(chosen.to_dict() | dict(grow=3))))
    np.testing.assert_array_equal(grown, expected.masks[0])
    assert "Traceback" not in tab.content() and tab.external_requests == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.slow
def test_browser_bad_inputs_show_their_message(served, browser, tmp_path):
    url, _ = served
    tab = open_page(browser, url)
    tab.fill("#prompts textarea", "cat")
    segment(tab, "Upload, paste or photograph an image first")
    upload(tab, "#image", save(scene(64, 48), tmp_path / "ok.png"))
    tab.wait_for_selector("#image img")
    tab.fill("#prompts textarea", "")
    segment(tab, "Enter at least one text prompt")
    tab.fill("#prompts textarea", "\n".join(f"thing {i}" for i in range(21)))
    segment(tab, "21 prompts given; at most 20")
    tab.fill("#prompts textarea", "cat")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    upload(tab, "#image", tmp_path / "broken.png")
    segment(tab, "'broken.png' cannot be used: cannot decode")
    upload(tab, "#image", huge_png(tmp_path / "huge.png"))
    segment(tab, "too large (9000x9000")
    upload(tab, "#image", tmp_path / "ok.png")
    tab.click("text=Image prompt (optional)")
    upload_support(tab, save(scene(100, 80, seed=3), tmp_path / "support.png"))
    upload(tab, "#support-mask", save(box_mask(30, 30, (0, 0, 10, 10)), tmp_path / "small.png"))
    tab.wait_for_selector("#support-mask img")
    segment(tab, "is 30x30 but the support image is 100x80")
    assert "Traceback" not in tab.content() and tab.external_requests == []


# -------------------------------------------------------------------------------------- the screenshot


def make_screenshot(model_source: str, destination: str, executable: str = "/usr/bin/chromium") -> None:
    """Segment the first example image with its prompts in the page and save a screenshot of the page."""
    segmenter = Segmenter(load_model(model_source, None, "cpu"), model_source)
    with serving(segmenter) as url, chromium_context(executable, tempfile.mkdtemp()) as context:
        tab = open_page(context, url)
        name, prompts = app.EXAMPLES[0]
        upload(tab, "#image", app.EXAMPLES_DIR / name)
        tab.fill("#prompts textarea", prompts)
        tab.wait_for_selector("#image img")
        segment(tab, "Segmented")
        tab.wait_for_selector("#overlay img")
        tab.set_viewport_size({"width": 1400, "height": 1100})  # down to the download, above the examples
        tab.wait_for_timeout(500)
        shot = Image.open(io.BytesIO(tab.screenshot())).convert("RGB")
        shot.quantize(256).save(destination, optimize=True)  # a palette PNG: a third of the size


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a screenshot of the app segmenting an example image.")
    parser.add_argument("--model", default="checkpoints/demo")
    parser.add_argument("--screenshot", default="docs/app.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    cli = parser.parse_args()
    make_screenshot(cli.model, cli.screenshot, cli.chromium)
