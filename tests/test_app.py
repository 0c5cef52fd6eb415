"""app.py: the command line, the page over `clipseg.segmenter.Segmenter` (tests/test_segmenter.py tests the logic),
the server as raw HTTP clients and `gradio_client` see it (hostile payloads included), and the page itself in a real
headless Chromium.

The server tests need Gradio (requirements-app.txt), the browser tests Playwright too and Debian's `chromium`; they
skip locally when one is missing, naming it, and fail under CI=true.

    python tests/test_app.py --model checkpoints/demo --screenshot docs/app.png   # the README's screenshot
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import box_mask, free_port, huge_png, read_zip, require, save, scene, vision_tower_calls  # noqa: E402

import app  # noqa: E402
from clipseg.loading import load_model  # noqa: E402
from clipseg.segmenter import NATIVE, Output, Segmenter  # noqa: E402
from clipseg.sessions import MB  # noqa: E402
from model import CLIPSeg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------------------------------- the model


MASK_CONTROLS = ["grow", "shrink", "feather", "fill_holes", "min_area", "instances", "max_instances", "sort_by"]
MASK_CONTROLS += ["refine", "tile", "formats"]
MASK_DEFAULTS = [0, 0, 0, False, 0, False, 0, "area", "none", False, ["mask"]]  # the page's mask controls as shown


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    """The tiny saved CLIPSeg (image size 64), loaded as a hub id would be."""
    return CLIPSeg.from_pretrained(tiny_checkpoints / "demo").eval()


@pytest.fixture
def segmenter(model, tmp_path):
    return Segmenter(model, "tiny", workdir=tmp_path)


# --------------------------------------------------------------------------------------- the command line


def test_cli_checks_its_arguments(capsys):
    args = app.parse_args([])
    assert (args.model, args.port, args.threshold, args.share) == (None, 7860, None, False)  # None: the model's
    assert args.precision in ("fp32", "bf16", "int8")
    assert (args.session_memory, args.idle_minutes, args.sam_model) == (1024, 30, None)  # None: no sam on the page
    for bad in (["--threshold", "1.2"], ["--port", "0"], ["--session-memory", "10"], ["--idle-minutes", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            app.parse_args(bad)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "--threshold must be in [0, 1)" in errors and "--session-memory must be at least 64 (MB)" in errors


def test_cli_reports_a_model_it_cannot_load(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """As every command: a model that cannot be loaded is a message and exit status 2, never a page without one."""
    gradio_or_skip()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app, "launch", lambda *args: pytest.fail("served without a model"))
    assert app.main(["--model", "nope", "--checkpoints-dir", str(tiny_checkpoints)]) == 2
    assert "nope is neither a run in" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert app.main(["--model", str(tmp_path / "broken")]) == 2
    assert f"error: cannot load the model {tmp_path / 'broken'}: " in capsys.readouterr().err
    assert app.main([]) == 2  # the default, the released weights, is not in this offline machine's hub cache
    assert "cannot load the model CIDAS/clipseg-rd64-refined: " in capsys.readouterr().err


def test_page_keeps_gradio_analytics_off(segmenter):
    gradio_or_skip()
    page = app.build_page(segmenter, 0.3)
    assert page.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_a_missing_package_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed .*CI must run this test"):
        require("chromium", "apt-get install chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"chromium is not installed \(apt-get install chromium\)"):
        require("chromium", "apt-get install chromium")


# ---------------------------------------------------------------------------------------- in the browser


def gradio_or_skip():
    try:
        import gradio  # noqa: F401
    except ImportError:
        require("gradio", "pip install -r requirements-app.txt")


@contextmanager
def serving(segmenter: Segmenter):
    """The app on a free local port: yields its URL."""
    page = app.build_page(segmenter)
    url, _ = app.launch(page, free_port())
    try:
        yield url
    finally:
        page.close()


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
def served(model, browser, tmp_path_factory):
    segmenter = Segmenter(model, "tiny", workdir=tmp_path_factory.mktemp("app"))
    with serving(segmenter) as url:
        yield url, segmenter


@pytest.mark.slow
def test_browser_two_text_prompts_give_overlay_heatmaps_and_masks(model, served, browser, tmp_path):
    from playwright.sync_api import expect

    url, _ = served
    tab = open_page(browser, url)
    upload(tab, "#image", save(scene(203, 151), tmp_path / "room.png"))
    tab.fill("#prompts textarea", "red disc\nblue square")
    tab.wait_for_selector("#image img")
    with vision_tower_calls(model) as calls:
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


def set_number(tab, selector: str, value) -> None:
    """Type `value` into a slider's or number box's field and press Enter, as a user sets it; waits until the
    component holds it."""
    from playwright.sync_api import expect

    field = tab.locator(f"{selector} input[type=number]")
    field.fill(str(value))
    field.press("Enter")
    expect(field).to_have_value(str(value), timeout=WAIT_MS)


@pytest.mark.slow
def test_browser_mask_controls_give_the_pipelines_mask_and_the_chosen_files(model, served, browser, tmp_path):
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
    assert summary["pipeline"]["mask"] == chosen.to_dict() and summary["threshold"] == 0.55

    predictor = Predictor(model)
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


# ---------------------------------------------------------------------- the server, as any HTTP client sees it


@pytest.fixture(scope="module")
def api_server(model, tmp_path_factory):
    """The app on a free local port (no browser): yields its URL."""
    gradio_or_skip()
    with serving(Segmenter(model, "tiny", workdir=tmp_path_factory.mktemp("api"))) as url:
        yield url


@pytest.fixture
def in_upload_folder():
    """A fresh folder inside Gradio's upload folder, where only the server itself writes (removed afterwards)."""
    from gradio.utils import get_upload_folder

    os.makedirs(get_upload_folder(), exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=get_upload_folder(), prefix="test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def segment_request(url: str, data: list, timeout: float = 20) -> dict:
    """Press Segment as a raw client can: POST the event to Gradio's queue with any payload, then read its event
    stream until the event completes; returns the final message (or {"msg": "timeout"})."""
    import httpx

    config = httpx.get(url + "config").json()
    (button,) = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "segment"]
    (fn_index,) = [d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"]]
    session = uuid.uuid4().hex
    join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": button}
    httpx.post(url + "gradio_api/queue/join", json=join).raise_for_status()
    try:
        with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=timeout) as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    return message
    except httpx.ReadTimeout:
        pass
    return {"msg": "timeout"}


def status_of(message: dict) -> str:
    """The status line an event answered with, or why the event failed."""
    if not message.get("success"):
        return f"event failed: {message}"
    return message["output"]["data"][1]


@pytest.mark.slow
def test_the_server_reads_no_file_a_client_names_outside_its_upload_folder(api_server, in_upload_folder, tmp_path):
    url = api_server
    planted = save(scene(64, 48), tmp_path / "planted.png")  # a readable image elsewhere on the server
    (tmp_path / "secret.txt").write_text("not an image")
    os.mkfifo(tmp_path / "fifo")
    os.mkfifo(in_upload_folder / "fifo.png")
    (in_upload_folder / "link.png").symlink_to(planted)
    with open(in_upload_folder / "huge.png", "wb") as huge:  # 300 MB, sparse
        huge.truncate(300 * MB)
    meta = {"_type": "gradio.FileData"}
    not_uploaded = "was not uploaded to this page: upload the file"
    cases = [  # (image payload, support payload, support-mask payload, what the status says)
        ({"path": str(planted)}, None, None, f"The image {not_uploaded}"),
        ({"path": str(tmp_path / "secret.txt")}, None, None, f"The image {not_uploaded}"),  # the same words for any
        ({"path": str(tmp_path / "missing.png")}, None, None, f"The image {not_uploaded}"),
        ({"path": str(tmp_path)}, None, None, f"The image {not_uploaded}"),
        ({"path": str(tmp_path / "fifo")}, None, None, f"The image {not_uploaded}"),
        ({"path": str(in_upload_folder / "link.png")}, None, None, f"The image {not_uploaded}"),
        ({"path": str(in_upload_folder / "fifo.png")}, None, None, "The image is not a regular file"),
        ({"path": str(in_upload_folder)}, None, None, "The image is not a regular file"),
        ({"path": str(in_upload_folder / "huge.png")}, None, None, "The image is over 100 MB, the upload limit"),
        ({"url": "data:image/png;base64,iVBORw0KGgo="}, None, None, f"The image {not_uploaded}"),
        ({"path": f"{in_upload_folder}/a\x00b.png"}, None, None, f"The image {not_uploaded}"),
        ({"path": 7, "orig_name": ["x"]}, None, None, "event failed"),  # Gradio validates the types
        ({"path": str(planted), "meta": meta}, None, None, "event failed"),  # Gradio's own check
        (None, {"background": {"path": str(planted)}, "layers": []}, None, "event failed"),  # needs meta
        (None, None, {"path": str(planted)}, f"The support mask {not_uploaded}"),
    ]
    for image, support, support_mask, expected in cases:
        started = time.perf_counter()
        reply = segment_request(url, [None, image, "red disc", support, support_mask, 0.3, NATIVE, *MASK_DEFAULTS])
        assert time.perf_counter() - started < 10, (image, reply)  # a FIFO never hangs the queue
        assert expected in status_of(reply) and "Segmented" not in json.dumps(reply), (image, reply)
        assert not reply.get("success") or reply["output"]["data"][2] is None  # no overlay
    from gradio_client import Client, handle_file

    status, overlay, *_ = Client(url, verbose=False).predict(
        handle_file(planted), "red disc", None, None, 0.3, NATIVE, *MASK_DEFAULTS, api_name="/segment"
    )
    assert status.startswith("Segmented `planted.png`") and Image.open(overlay).size == (64, 48)  # uploaded: fine


def test_the_api_has_named_endpoints_and_outputs(api_server):
    from gradio_client import Client

    api = Client(api_server, verbose=False).view_api(print_info=False, return_format="dict")
    outputs = ["Status", "Overlay", "Probability per prompt (black 0, yellow 1)"]
    outputs += ["Masks: a PNG per prompt at the original size + summary.json", "Summary"]
    assert api["unnamed_endpoints"] == {}
    assert {name: [p["parameter_name"] for p in e["parameters"]] for name, e in api["named_endpoints"].items()} == {
        "/segment": ["image", "prompts", "support", "support_mask", "threshold", "geometry", *MASK_CONTROLS],
        "/rethreshold": ["threshold", *MASK_CONTROLS],
    }
    assert all([r["label"] for r in e["returns"]] == outputs for e in api["named_endpoints"].values())


def test_the_support_editor_keeps_no_blob_a_client_posts(api_server):
    import httpx

    config = httpx.get(api_server + "config").json()
    (editor,) = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "support"]
    form = {"session_hash": "s", "component_id": str(editor), "fn_name": "accept_blobs", "id": "x", "index": "null"}
    reply = httpx.post(
        api_server + "gradio_api/component_server",
        data=form | {"type": "background"},
        files={"file": ("background.png", b"\0" * MB)},
    )
    assert reply.status_code == 404  # Gradio would keep the megabyte until the editor's next preprocessing


def test_the_queue_holds_at_most_max_queue_requests(model, tmp_path, monkeypatch):
    import threading

    import httpx

    gradio_or_skip()
    segmenter, release = Segmenter(model, "tiny", workdir=tmp_path), threading.Event()
    monkeypatch.setattr(segmenter, "segment", lambda session, *_: release.wait(30) and (session, Output("done")))
    with serving(segmenter) as url:
        config = httpx.get(url + "config").json()
        (button,) = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "segment"]
        (fn_index,) = [d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"]]
        data = [None, None, "cat", None, None, 0.3, NATIVE, *MASK_DEFAULTS]
        with httpx.Client(base_url=url) as client:
            replies = [
                client.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": str(i)})
                for i in range(app.MAX_QUEUE + 8)
            ]
        release.set()
    accepted = [reply for reply in replies if reply.status_code == 200]
    refused = [reply for reply in replies if reply.status_code == 503]
    assert len(accepted) == app.MAX_QUEUE + 1 and len(refused) == 7  # one runs, MAX_QUEUE wait
    assert "Queue is full" in refused[0].text


def outward_address() -> str | None:
    """This machine's address on its default route (not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_server_listens_on_loopback_only_and_serves_no_file_outside_its_cache(api_server, tmp_path):
    import httpx

    url = api_server
    assert url.startswith("http://127.0.0.1:")
    address = outward_address()
    if address is not None:
        with pytest.raises(OSError):
            socket.create_connection((address, int(url.rstrip("/").rsplit(":", 1)[1])), timeout=3).close()
    secret = tmp_path / "secret.txt"
    secret.write_text("the server must not send this")
    for route in (f"gradio_api/file={secret}", f"file={secret}", f"gradio_api/file={secret.parent}/../{secret.name}"):
        reply = httpx.get(url + route)
        assert reply.status_code in (403, 404) and "must not send" not in reply.text, (route, reply.status_code)


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


def test_the_threshold_slider_starts_at_the_models_calibrated_threshold(model, tiny_checkpoints, tmp_path):
    gradio_or_skip()
    calibrated = CLIPSeg.from_pretrained(tiny_checkpoints / "demo").eval()
    calibrated.config.threshold, calibrated.config.threshold_origin = 0.62, "validation mIoU curve"
    sliders = {}
    for name, segmenter, given in (
        ("calibrated", Segmenter(calibrated, "tiny", workdir=tmp_path / "a"), None),
        ("paper", Segmenter(model, "tiny", workdir=tmp_path / "b"), None),
        ("given", Segmenter(calibrated, "tiny", workdir=tmp_path / "c"), 0.4),
    ):
        page = app.build_page(segmenter, given)
        (slider,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "threshold"]
        sliders[name] = slider.value
        page.close()
    assert sliders == {"calibrated": 0.62, "paper": 0.3, "given": 0.4}


def test_the_mask_controls_reach_the_pipeline_through_the_api(api_server, tmp_path):
    """/segment with grow and the zip's formats: the zip holds the chosen files and the grown mask covers the plain
    one and more (as `make_mask` grows it)."""
    from gradio_client import Client, handle_file

    client = Client(api_server, verbose=False)
    image = handle_file(save(scene(96, 80), tmp_path / "room.png"))
    plain = client.predict(image, "red disc", None, None, 0.3, NATIVE, *MASK_DEFAULTS, api_name="/segment")
    grown_controls = [8, 0, 0, False, 0, False, 0, "area", "none", False, ["mask", "soft", "cutout"]]
    grown = client.predict(image, "red disc", None, None, 0.3, NATIVE, *grown_controls, api_name="/segment")
    zips = {name: read_zip(reply[3])[0] for name, reply in (("plain", plain), ("grown", grown))}
    assert not any(n.endswith((".soft.png", ".cutout.png")) for n in zips["plain"])
    assert any(n.endswith(".soft.png") for n in zips["grown"]) and any(n.endswith(".cutout.png") for n in zips["grown"])
    before, after = (
        np.asarray(next(image for n, image in zips[name].items() if n.endswith(".mask.png"))) > 0
        for name in ("plain", "grown")
    )
    assert before.any() and after.sum() > before.sum() and after[before].all()


def refine_choices(url: str) -> list[str]:
    """The values the page's "Refine the edges" radio offers."""
    import httpx

    config = httpx.get(url + "config").json()
    (refine,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "refine"]
    return [value for _, value in refine["props"]["choices"]]


@contextmanager
def app_main(argv: list[str], timeout: float = 120):
    """`app.main(argv)` in a thread until its server answers: yields (its URL, [its exit status once stopped]); the
    page is closed (main then returns) on leaving."""
    import threading

    import httpx

    pages, launch, status = [], app.launch, []

    def launched(page, *args):
        served = launch(page, *args)
        pages.append(page)
        return served

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "launch", launched)
        server = threading.Thread(target=lambda: status.append(app.main(argv)), daemon=True)
        server.start()
        deadline = time.monotonic() + timeout
        while not pages and server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert pages, f"app.main did not serve: exit status {status}"
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/"
    try:
        assert httpx.get(url + "config").status_code == 200
        yield url, status
    finally:
        pages[0].close()
        server.join(30)


def test_sam_model_offers_refining_with_sam_and_a_bad_one_exits_2(model, api_server, tiny_checkpoints, tiny_sam,
                                                                   tmp_path, capsys):  # fmt: skip
    """--sam-model: loaded and checked at start-up; the page then offers sam (without it, not) and /segment refines
    with it as the library does. A path that is no SAM model: a message naming it, exit status 2, nothing served."""
    from gradio_client import Client, handle_file

    from clipseg.postprocess import MaskOptions
    from clipseg.predictor import Predictor
    from clipseg.refine import SamRefiner

    demo, bad = tiny_checkpoints / "demo", tmp_path / "no_sam"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "launch", lambda *args: pytest.fail("served without its SAM model"))
        assert app.main(["--model", str(demo), "--sam-model", str(bad)]) == 2
    assert f"error: --sam-model: the SAM model {str(bad)!r} has no config.json" in capsys.readouterr().err
    assert "sam" not in refine_choices(api_server)
    sam = tiny_sam()
    argv = ["--model", str(demo), "--sam-model", str(sam), "--port", str(free_port()), "--precision", "fp32"]
    image = scene(96, 80)
    controls = [0, 0, 0, False, 0, True, 2, "area", "sam", False, ["mask"]]  # SAM prompted by the 2 largest parts
    with app_main([*argv, "--device", "cpu"]) as (url, status):
        assert refine_choices(url) == ["none", "guided", "sam"]
        reply = Client(url, verbose=False).predict(
            handle_file(save(image, tmp_path / "room.png")), "red disc", None, None, 0.5, NATIVE, *controls,
            api_name="/segment",
        )  # fmt: skip
    assert status == [0]
    assert reply[0].startswith("Segmented `room.png`"), reply[0]
    masks, summary = read_zip(reply[3])
    (entry,) = summary["images"][0]["prompts"]
    assert summary["pipeline"]["refine"] == "sam" and len(entry["sam_scores"]) == 2
    predictor = Predictor(model)
    predictor.set_image(image)
    options = MaskOptions(instances=True, max_instances=2)
    expected = predictor.predict_masks(
        ["red disc"], 0.5, options, refine="sam", sam=SamRefiner.from_pretrained(str(sam))
    )
    mask = np.asarray(masks[entry["files"]["mask"]]) > 0
    np.testing.assert_array_equal(mask, expected.masks[0])
    assert not np.array_equal(mask, predictor.predict_masks(["red disc"], 0.5, options).masks[0])  # SAM's mask
