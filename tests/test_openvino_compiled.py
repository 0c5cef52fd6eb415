"""clipseg.onnx.openvino_compiled: an export's graphs compiled for this CPU, kept in a folder and imported by later
openings with the same outputs (and the same inference precision, which OpenVINO would otherwise pick itself); a
kept graph that was tampered with, whose record is not ours, or that was compiled on another CPU is compiled again.

Exports the tiny model in fp32 once per module (about 20 s on 2 cores). Needs requirements-openvino.txt (`make test`
installs it); skipped with a message elsewhere, never in CI.
"""

import json
import os
import shutil
import time

import pytest
import torch
from conftest import AVX2_EPYC, folder_files, random_image, require_modules, save, simulate_cpu

require_modules(("onnx", "onnxscript", "onnxruntime", "openvino"), "requirements-openvino.txt")

from clipseg.onnx.openvino_backend import IR_FILES, OpenVinoCLIPSeg, openvino_core  # noqa: E402
from clipseg.onnx.openvino_compiled import compiled_key, prune_unused, recorded_options  # noqa: E402
from clipseg.onnx.openvino_export import export_openvino  # noqa: E402
from predict import main as predict_main  # noqa: E402

DAY = 86400


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino_fp32")
    export_openvino(model, out, "fp32")
    return out


@pytest.fixture
def compiles(monkeypatch) -> list:
    """The graphs OpenVinoCLIPSeg compiles from now on (they are still compiled)."""
    calls = []
    compiled = OpenVinoCLIPSeg._compiled

    def counting(self, model, graph, options):
        calls.append(graph)
        return compiled(self, model, graph, options)

    monkeypatch.setattr(OpenVinoCLIPSeg, "_compiled", counting)
    return calls


def logits(runner) -> torch.Tensor:
    """The runner's logits for a fixed image and two prompts: (2, 1, 64, 64)."""
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return runner.decode(runner.encode_image(pixels), runner.embed_text(["a red circle", "sky"]))


def test_compiled_graphs_are_kept_and_imported_with_the_same_outputs(export_dir, compiles, tmp_path):
    reference = logits(OpenVinoCLIPSeg(export_dir))
    compiles.clear()
    first = OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    assert sorted(compiles) == sorted(IR_FILES)
    assert len(list(tmp_path.glob("*.blob"))) == len(list(tmp_path.glob("*.json"))) == len(IR_FILES)
    assert torch.equal(logits(first), reference)
    compiles.clear()
    second = OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    assert compiles == [] and second.models == {}  # imported: not compiled, the graph files not even read
    assert torch.equal(logits(second), reference)
    assert second.inference_precision() == "f32"  # as compiled: OpenVINO's default is bf16 where it is native
    assert {p.suffix for p in tmp_path.iterdir()} == {".blob", ".json"}  # no temporary file left


def test_a_tampered_or_foreign_compiled_graph_is_compiled_again(export_dir, compiles, tmp_path, monkeypatch):
    reference = logits(OpenVinoCLIPSeg(export_dir, compiled=tmp_path))
    blobs = sorted(tmp_path.glob("*.blob"))
    data = bytearray(blobs[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(data))  # a changed blob: its SHA-256 is not the recorded one
    record = blobs[1].with_suffix(".json")
    options = json.loads(record.read_text())
    record.write_text(json.dumps({**options, "options": {**options["options"], "CACHE_DIR": "/elsewhere"}}))
    blobs[2].with_suffix(".json").write_text("[not json")
    blobs[3].unlink()
    os.mkfifo(blobs[3])  # reading it would wait for ever
    compiles.clear()
    runner = OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    assert len(compiles) == 4 and torch.equal(logits(runner), reference)
    compiles.clear()
    OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    assert compiles == []  # the four were kept again
    simulate_cpu(monkeypatch, {"avx2": True, "simulated": True})  # instruction sets no real CPU reports
    OpenVinoCLIPSeg(export_dir, compiled=tmp_path)  # another CPU: none of this one's compiled graphs is used
    assert sorted(compiles) == sorted(IR_FILES)


def test_the_key_covers_the_graph_what_was_asked_and_the_cpu(monkeypatch):
    core = openvino_core()
    key = compiled_key(core, ["a" * 64, "b" * 64], {"precision": "int8", "threads": None})
    assert key == compiled_key(core, ["a" * 64, "b" * 64], {"precision": "int8", "threads": None})
    assert key != compiled_key(core, ["a" * 64, "c" * 64], {"precision": "int8", "threads": None})
    assert key != compiled_key(core, ["a" * 64, "b" * 64], {"precision": "int8", "threads": 1})
    simulate_cpu(monkeypatch, AVX2_EPYC)
    assert key != compiled_key(core, ["a" * 64, "b" * 64], {"precision": "int8", "threads": None})


@pytest.mark.parametrize(
    ("options", "usable"),
    [
        ({"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}, True),
        ({"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}, True),
        ({"INFERENCE_PRECISION_HINT": "f16"}, False),
        ({"CACHE_DIR": "/elsewhere"}, False),
        ({"INFERENCE_NUM_THREADS": 0}, False),
        ({"INFERENCE_NUM_THREADS": True}, False),
        ("f32", False),
    ],
)
def test_only_the_options_we_compile_with_are_taken_from_a_record(options, usable):
    assert recorded_options({"sha256": "0" * 64, "options": options}) == (options if usable else None)


def aged(path, days: float, content: str = "x"):
    """`path` written with `content` and last modified `days` ago."""
    path.write_text(content)
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def test_kept_graphs_unused_for_two_weeks_and_crash_leftovers_are_pruned(tmp_path, capsys):
    old, new, kept, orphan_old, orphan_new = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)
    for key, days in ((old, 15), (new, 13), (kept, 30)):
        aged(tmp_path / f"{key}.blob", days, "b" * 1_000_000)
        aged(tmp_path / f"{key}.json", days)
    aged(tmp_path / f"{orphan_old}.blob", 2)  # a crash between the blob and its record
    aged(tmp_path / f"{orphan_new}.blob", 0.5)  # perhaps being written by another process now
    aged(tmp_path / f".{new}.blob.x1y2.tmp", 2)
    aged(tmp_path / f".{new}.blob.z3w4.tmp", 0.5)
    aged(tmp_path / "notes.txt", 100)  # not ours
    (tmp_path / f"{'f' * 64}.json").symlink_to(tmp_path / "notes.txt")
    removed = prune_unused(tmp_path, keep=[kept])
    assert sorted(p.name for p in removed) == sorted(
        [f"{old}.blob", f"{old}.json", f"{orphan_old}.blob", f".{new}.blob.x1y2.tmp"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{new}.blob", f"{new}.json", f"{kept}.blob", f"{kept}.json", f"{orphan_new}.blob"]
        + [f".{new}.blob.z3w4.tmp", "notes.txt", f"{'f' * 64}.json"]
    )
    said = "removed 4 compiled graph files unused for 14 days or left by a crash (1 MB)"
    assert f"{said} from {tmp_path}" in capsys.readouterr().err
    assert prune_unused(tmp_path / "missing") == []


def test_an_import_marks_the_graph_used_and_keeping_one_prunes(export_dir, compiles, tmp_path):
    OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    records = sorted(tmp_path.glob("*.json"))
    for record in records:
        os.utime(record, (time.time() - 20 * DAY,) * 2)
    OpenVinoCLIPSeg(export_dir, compiled=tmp_path)  # imported: each record touched
    assert all(time.time() - record.stat().st_mtime < DAY for record in records)
    stale = aged(tmp_path / f"{'a' * 64}.json", 20)
    aged(tmp_path / f"{'a' * 64}.blob", 20)
    (records[0].with_suffix(".blob")).unlink()  # one graph compiled and kept again: the folder is pruned
    compiles.clear()
    OpenVinoCLIPSeg(export_dir, compiled=tmp_path)
    assert len(compiles) == 1 and not stale.exists() and records[0].with_suffix(".blob").exists()


def test_a_run_whose_export_was_removed_since_it_opened_keeps_its_shape_generic_graphs(export_dir, tmp_path, capsys):
    """Graphs imported from the cache are read from the export only to compile one for a shape: a folder pruned
    from the cache by another process meanwhile (or removed) costs that speed-up, not the run."""
    copy = shutil.copytree(export_dir, tmp_path / "export")
    reference = logits(OpenVinoCLIPSeg(copy, compiled=tmp_path / "compiled"))
    runner = OpenVinoCLIPSeg(copy, compiled=tmp_path / "compiled", static_after=1)
    shutil.rmtree(copy)
    assert torch.equal(logits(runner), reference) and runner.static_after is None
    assert "graphs are no longer compiled per shape in this run" in capsys.readouterr().err


def test_predict_keeps_an_export_folders_compiled_graphs_in_the_cache(export_dir, compiles, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path / "cache"))
    image = save(random_image(80, 60), tmp_path / "photo.png")
    outputs = []
    for run in ("first", "second"):
        compiles.clear()
        argv = [str(image), "--prompt", "a red circle", "--backend", "openvino", "--model", str(export_dir)]
        assert predict_main([*argv, "--out", str(tmp_path / run)]) == 0
        outputs.append({name: data for name, data in folder_files(tmp_path / run).items() if name.endswith(".png")})
        assert len(compiles) == (len(IR_FILES) if run == "first" else 0)
    assert len(list((tmp_path / "cache" / "openvino" / "compiled").glob("*.blob"))) == len(IR_FILES)
    assert outputs[0] and outputs[0] == outputs[1]
