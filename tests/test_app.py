"""app.py: the command line, the page over `clipseg.segmenter.Segmenter` (tests/test_segmenter.py tests the logic),
and the server as raw HTTP clients and `gradio_client` see it (hostile payloads included); the page itself in a real
headless Chromium is tests/test_app_browser.py's.

The server tests need Gradio (requirements-app.txt); they skip locally when it is missing, naming it, and fail under
CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import free_port, read_zip, require, save, scene  # noqa: E402
from helpers import gradio_or_skip, serving  # noqa: E402

import app  # noqa: E402
from clipseg.segmenter import NATIVE, Output, Segmenter  # noqa: E402
from clipseg.sessions import MB  # noqa: E402
from model import CLIPSeg  # noqa: E402

# ---------------------------------------------------------------------------------------------- the model


MASK_CONTROLS = ["grow", "shrink", "feather", "fill_holes", "min_area", "instances", "max_instances", "sort_by"]
MASK_CONTROLS += ["refine", "tile", "formats"]
MASK_DEFAULTS = [0, 0, 0, False, 0, False, 0, "area", "none", False, ["mask"]]  # the page's mask controls as shown


@pytest.fixture
def segmenter(demo_model, tmp_path):
    return Segmenter(demo_model, "tiny", workdir=tmp_path)


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
    assert "argument --threshold: must be in [0, 1), got 1.2" in errors
    assert "--session-memory must be at least 64 (MB)" in errors


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


# ---------------------------------------------------------------------- the server, as any HTTP client sees it


@pytest.fixture(scope="module")
def api_server(demo_model, tmp_path_factory):
    """The app on a free local port (no browser): yields its URL."""
    gradio_or_skip()
    with serving(Segmenter(demo_model, "tiny", workdir=tmp_path_factory.mktemp("api"))) as url:
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


def test_the_queue_holds_at_most_max_queue_requests(demo_model, tmp_path, monkeypatch):
    import threading

    import httpx

    gradio_or_skip()
    segmenter, release = Segmenter(demo_model, "tiny", workdir=tmp_path), threading.Event()
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


def test_the_threshold_slider_starts_at_the_models_calibrated_threshold(demo_model, tiny_checkpoints, tmp_path):
    gradio_or_skip()
    calibrated = CLIPSeg.from_pretrained(tiny_checkpoints / "demo").eval()
    calibrated.config.threshold, calibrated.config.threshold_origin = 0.62, "validation mIoU curve"
    sliders = {}
    for name, segmenter, given in (
        ("calibrated", Segmenter(calibrated, "tiny", workdir=tmp_path / "a"), None),
        ("paper", Segmenter(demo_model, "tiny", workdir=tmp_path / "b"), None),
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


def test_sam_model_offers_refining_with_sam_and_a_bad_one_exits_2(demo_model, api_server, tiny_checkpoints, tiny_sam,
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
    predictor = Predictor(demo_model)
    predictor.set_image(image)
    options = MaskOptions(instances=True, max_instances=2)
    expected = predictor.predict_masks(
        ["red disc"], 0.5, options, refine="sam", sam=SamRefiner.from_pretrained(str(sam))
    )
    mask = np.asarray(masks[entry["files"]["mask"]]) > 0
    np.testing.assert_array_equal(mask, expected.masks[0])
    assert not np.array_equal(mask, predictor.predict_masks(["red disc"], 0.5, options).masks[0])  # SAM's mask
