"""clipseg.onnx.openvino_cache and `--backend auto`: a PyTorch model converted to OpenVINO once and reused (and, while
its files are unchanged, opened without loading PyTorch), a failed conversion recorded and never tried again, and
what auto runs on each CPU class (OpenVINO int8 on AMX when it is installed, PyTorch elsewhere, an export folder in
its backend, PyTorch when a precision is asked for), with predict.py falling back to PyTorch when the conversion
fails.

Converts the tiny model once per module (the ONNX export and OpenVINO: about a minute on 2 cores). Needs
requirements-openvino.txt (`make test` installs it); skipped with a message elsewhere, never in CI.
"""

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import AMX_XEON, AVX2_EPYC, VNNI_EPYC, require_modules, run_command, save, scene, simulate_cpu

require_modules(("onnx", "onnxscript", "onnxruntime", "openvino", "nncf"), "requirements-openvino.txt")

import torch  # noqa: E402

import predict  # noqa: E402
from clipseg import backends, cli, precision  # noqa: E402
from clipseg.distributed import Distributed  # noqa: E402
from clipseg.loading import LoadError, load_model  # noqa: E402
from clipseg.onnx import openvino_cache, openvino_export  # noqa: E402
from clipseg.onnx.openvino_backend import IR_FILES, openvino_core  # noqa: E402
from clipseg.onnx.openvino_cache import (  # noqa: E402
    ConversionFailed,
    cached_export,
    conversion_key,
    prune_conversions,
    recorded_conversion,
    source_files,
    source_key,
)
from clipseg.onnx.openvino_compiled import compiled_key  # noqa: E402
from clipseg.onnx.openvino_export import AccuracyCheckFailed, export_openvino  # noqa: E402
from model import CLIPSeg  # noqa: E402
from predict import main as predict_main  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def auto(monkeypatch, cache):
    """--backend auto as a user gets it (the suite pins torch), with the module's cache."""
    monkeypatch.delenv("CLIPSEG_BACKEND", raising=False)
    monkeypatch.setenv("CLIPSEG_CACHE", str(cache))


@pytest.fixture(scope="module")
def converted(model, cache):
    """The tiny model's int8 conversion in the module's cache, made through cached_export on an AMX Xeon (simulated:
    the CPU's class is part of the cache key)."""
    os.environ["CLIPSEG_CACHE"] = str(cache)
    with pytest.MonkeyPatch.context() as monkeypatch:
        simulate_cpu(monkeypatch, AMX_XEON)
        return cached_export(model, "int8", "tiny")


def count_exports(monkeypatch) -> list:
    """The precisions export_openvino is called with from now on (it still runs)."""
    calls = []

    def counting(model, out_dir, precision, **kwargs):
        calls.append(precision)
        return export_openvino(model, out_dir, precision, **kwargs)

    monkeypatch.setattr(openvino_export, "export_openvino", counting)
    return calls


def test_a_conversion_is_made_once_and_reused(model, converted, auto, cache, monkeypatch, capsys):
    simulate_cpu(monkeypatch, AMX_XEON)
    assert converted.parent == cache / "openvino" and (converted / "manifest.json").is_file()
    manifest = json.loads((converted / "manifest.json").read_text())
    assert (manifest["precision"], manifest["source_model"]) == ("int8", "tiny")
    calls = count_exports(monkeypatch)
    aged(converted, 20)
    assert cached_export(model, "int8", "tiny") == converted and calls == []  # the cache answers
    assert time.time() - converted.stat().st_mtime < 60  # and the conversion is marked used
    assert f"cached in {converted}" in capsys.readouterr().err
    assert conversion_key(model, "int8") == converted.name
    assert conversion_key(model, "bf16") != converted.name  # another precision, another conversion
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.decoder.film_mul.weight[0, 0] += 1
    assert conversion_key(changed, "int8") != converted.name  # other weights, another conversion
    simulate_cpu(monkeypatch, VNNI_EPYC)  # a cache shared with a machine of another CPU class
    assert conversion_key(model, "int8") != converted.name
    assert not list(cache.glob("openvino/*.partial-*"))


def test_the_key_of_a_cache_hit_does_not_import_nncf(model, tiny_dir, tmp_path):
    """Importing nncf takes over a second: the key (what every run with a cached conversion computes) reads nncf's
    version from its package metadata instead, and is the same key."""
    script = tmp_path / "key.py"
    script.write_text(
        "import sys\n"
        "from clipseg.onnx.openvino_cache import conversion_key\n"
        "from model import CLIPSeg\n"
        f"key = conversion_key(CLIPSeg.from_pretrained({str(tiny_dir)!r}).eval(), 'int8')\n"
        "print(key, 'nncf' in sys.modules)\n"
    )
    result = run_command(str(script), [], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [conversion_key(model, "int8"), "False"]


def test_a_failed_conversion_is_recorded_and_not_tried_again(model, auto, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path))
    calls = []

    def failing(model, out_dir, precision, **kwargs):
        calls.append(precision)
        (out_dir / "image_encoder.xml").write_text("half written")
        raise AccuracyCheckFailed("the int8 OpenVINO graphs' masks agree with PyTorch fp32 on 97.00% of pixels")

    monkeypatch.setattr(openvino_export, "export_openvino", failing)
    with pytest.raises(ConversionFailed, match="conversion failed: the int8 OpenVINO graphs' masks agree .* 97.00%"):
        cached_export(model, "int8")
    assert "converting the model for this CPU, once" in capsys.readouterr().err
    record = tmp_path / "openvino" / f"{conversion_key(model, 'int8')}.failed.json"
    assert "97.00%" in json.loads(record.read_text())["reason"]
    assert [p.name for p in (tmp_path / "openvino").iterdir()] == [record.name]  # no half-written folder left
    with pytest.raises(ConversionFailed, match="failed before .*97.00%.* recorded in"):
        cached_export(model, "int8")
    assert calls == ["int8"]  # not tried again
    record.write_text("[not json")  # a damaged record is still a failure, said so, not a traceback
    with pytest.raises(ConversionFailed, match="failed before .the record cannot be read; recorded in"):
        cached_export(model, "int8")
    record.unlink()  # deleting the record tries again
    with pytest.raises(ConversionFailed):
        cached_export(model, "int8")
    assert calls == ["int8", "int8"]


@pytest.mark.parametrize(
    ("cpu", "installed", "expected"),
    [
        (AMX_XEON, True, ("openvino", "int8")),
        (AMX_XEON, False, ("torch", None)),
        (VNNI_EPYC, True, ("openvino", "int8")),
        (VNNI_EPYC, False, ("torch", None)),
        (AVX2_EPYC, True, ("torch", None)),
    ],
)
def test_auto_picks_the_measured_fastest_path_of_the_cpu_class(monkeypatch, cpu, installed, expected):
    simulate_cpu(monkeypatch, cpu)
    monkeypatch.setattr(precision, "openvino_installed", lambda: installed)
    assert backends.auto_backend("CIDAS/clipseg-rd64-refined", "cpu", precision_asked=False) == expected
    assert backends.auto_backend("CIDAS/clipseg-rd64-refined", "cpu", precision_asked=True) == ("torch", None)
    assert backends.auto_backend("CIDAS/clipseg-rd64-refined", "cuda", precision_asked=False) == ("torch", None)
    assert precision.default_path("cpu", "score") == ("torch", "fp32")  # scoring: the reference, everywhere


def test_auto_runs_an_export_folder_in_its_backend(converted):
    assert backends.auto_backend(str(converted), "cpu", precision_asked=False) == ("openvino", None)


def predict_run(tmp_path, model_dir, name, *flags) -> tuple[int, dict]:
    image = save(scene(96, 64), tmp_path / "scene.png")
    out = tmp_path / name
    code = predict_main([str(image), "--prompt", "a red circle", "--model", str(model_dir), "--out", str(out), *flags])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return code, summary


def test_predict_auto_runs_the_cached_openvino_int8_conversion_on_amx(
    tiny_dir, converted, auto, cache, tmp_path, monkeypatch, capsys
):
    simulate_cpu(monkeypatch, AMX_XEON)
    calls = count_exports(monkeypatch)
    code, summary = predict_run(tmp_path, tiny_dir, "small", "--image-size", "64")
    assert code == 0 and (summary["backend"], summary["precision"]) == ("torch", "bf16")  # too small to convert
    assert "a model with a 64-wide vision tower is not converted to OpenVINO (only from 768" in capsys.readouterr().err
    monkeypatch.setattr(cli, "OPENVINO_MIN_VISION_WIDTH", 64)  # as if it were ViT-B
    code, summary = predict_run(tmp_path, tiny_dir, "amx", "--image-size", "64")
    assert code == 0 and (summary["backend"], summary["precision"]) == ("openvino", "int8")
    assert f"cached in {converted}" in capsys.readouterr().err and calls == []
    simulate_cpu(monkeypatch, VNNI_EPYC)  # another CPU class: its own conversion, checked on it
    unused = fake_conversion(cache / "openvino", "9" * 64, 15)  # pruned when a conversion is made
    code, summary = predict_run(tmp_path, tiny_dir, "vnni", "--image-size", "64")
    assert code == 0 and (summary["backend"], summary["precision"]) == ("openvino", "int8") and calls == ["int8"]
    assert not unused.exists() and converted.is_dir()
    simulate_cpu(monkeypatch, AVX2_EPYC)
    code, summary = predict_run(tmp_path, tiny_dir, "avx2", "--image-size", "64")
    assert code == 0 and (summary["backend"], summary["precision"]) == ("torch", "fp32")
    simulate_cpu(monkeypatch, AMX_XEON)
    code, summary = predict_run(tmp_path, tiny_dir, "asked", "--image-size", "64", "--precision", "fp32")
    assert code == 0 and (summary["backend"], summary["precision"]) == ("torch", "fp32")


def test_predict_auto_falls_back_to_pytorch_when_the_conversion_fails(tiny_dir, auto, tmp_path, monkeypatch, capsys):
    simulate_cpu(monkeypatch, AMX_XEON)
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path / "cache"))  # nothing converted or recorded yet

    def failing(*args, **kwargs):
        raise ConversionFailed("its OpenVINO int8 conversion failed: masks agree on 97.00% of pixels")

    monkeypatch.setattr(openvino_cache, "cached_export", failing)
    monkeypatch.setattr(cli, "OPENVINO_MIN_VISION_WIDTH", 64)  # as if it were ViT-B
    code, summary = predict_run(tmp_path, tiny_dir, "fallback", "--image-size", "64")
    err = capsys.readouterr().err
    assert code == 0 and (summary["backend"], summary["precision"]) == ("torch", "bf16")
    assert "note: its OpenVINO int8 conversion failed: masks agree on 97.00% of pixels; running PyTorch bf16" in err


def test_a_wrong_clipseg_backend_is_a_usage_error(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPSEG_BACKEND", "tensorrt")
    with pytest.raises(SystemExit) as exit_info:
        predict_run(tmp_path, tiny_dir, "wrong")
    assert exit_info.value.code == 2
    assert "$CLIPSEG_BACKEND=tensorrt is not a backend; choose auto, torch, onnx, openvino" in capsys.readouterr().err


def test_under_torchrun_the_ranks_load_a_model_to_convert_one_after_another(monkeypatch):
    """Rank 0 converts, the others then open its cached conversion; a rank whose load fails still passes every
    barrier (no hang) and then raises."""
    turns = []

    def in_turn(world, action):
        turns.append(world.rank)
        return action()

    def failing(args):
        raise LoadError("cannot load the model nowhere")

    monkeypatch.setattr(predict, "in_turn", in_turn)
    monkeypatch.setattr(predict, "load", lambda args: "the model")
    world, args = Distributed(rank=1, world_size=2), argparse.Namespace(convert_to="int8")
    assert predict.load_in_turn(args, world) == "the model" and turns == [1]
    assert predict.load_in_turn(argparse.Namespace(convert_to=None), world) == "the model" and turns == [1]
    assert predict.load_in_turn(args, Distributed()) == "the model" and turns == [1]  # one process: no turns
    monkeypatch.setattr(predict, "load", failing)
    with pytest.raises(LoadError, match="cannot load the model nowhere"):
        predict.load_in_turn(args, world)
    assert turns == [1, 1]


def test_an_int8_export_checked_on_another_cpu_class_says_so(converted, tmp_path, monkeypatch, capsys):
    assert json.loads((converted / "manifest.json").read_text())["accuracy_check"]["cpu_class"] == "amx"
    simulate_cpu(monkeypatch, AMX_XEON)
    code, summary = predict_run(tmp_path, converted, "same", "--backend", "openvino")
    assert code == 0 and summary["backend"] == "openvino"
    assert "was checked against PyTorch on a CPU of class" not in capsys.readouterr().err
    simulate_cpu(monkeypatch, VNNI_EPYC)
    code, summary = predict_run(tmp_path, converted, "other", "--backend", "openvino")
    assert code == 0 and summary["backend"] == "openvino"  # it still runs, with the note
    assert (
        f"note: {converted} was checked against PyTorch on a CPU of class amx and this one is of class vnni, whose "
        "int8 kernels differ: export it again on this CPU"
    ) in capsys.readouterr().err


def test_an_unknown_recorded_cpu_class_is_not_echoed(converted, tmp_path, monkeypatch):
    folder = tmp_path / "edited"
    shutil.copytree(converted, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["accuracy_check"]["cpu_class"] = "\x1b[2Jamx"  # a terminal escape in an untrusted manifest
    (folder / "manifest.json").write_text(json.dumps(manifest))
    simulate_cpu(monkeypatch, VNNI_EPYC)
    note = load_model(str(folder), None, "cpu", "int8", "openvino").checked_elsewhere()
    assert "on a CPU of class unknown and this one is of class vnni" in note and "\x1b" not in note


def replace_file(path, data: bytes) -> None:
    """Write `data` to `path` as tools that save a model do: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def test_a_recorded_conversion_opens_without_loading_pytorch(
    tiny_dir, converted, auto, cache, tmp_path, monkeypatch, capsys
):
    """The second run of a model whose files have not changed opens its conversion straight from the record (about
    2.5 s sooner at ViT-B/16, where finding the key means loading the model); a rewritten file takes the long way."""
    simulate_cpu(monkeypatch, AMX_XEON)
    monkeypatch.setattr(cli, "OPENVINO_MIN_VISION_WIDTH", 64)  # as if it were ViT-B
    mine = tmp_path / "mine"
    shutil.copytree(tiny_dir, mine)
    calls = count_exports(monkeypatch)
    code, first = predict_run(tmp_path, mine, "first", "--image-size", "64")
    assert code == 0 and (first["backend"], first["precision"]) == ("openvino", "int8") and calls == []
    record = cache / "openvino" / "sources" / f"{source_key(str(mine), None, 'int8')}.json"
    assert json.loads(record.read_text()) == {"conversion": converted.name, "source": str(mine)}
    manifest, core = json.loads((converted / "manifest.json").read_text()), openvino_core()
    kept = {blob.stem for blob in (cache / "openvino" / "compiled").glob("*.blob")}
    for files in IR_FILES.values():  # its graphs, compiled for this CPU, kept for the next run
        assert compiled_key(core, [manifest["files"][f] for f in files], {"precision": "int8", "threads": None}) in kept
    loads = []
    original = CLIPSeg.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPSeg, "from_pretrained", classmethod(counting))
    capsys.readouterr()
    code, second = predict_run(tmp_path, mine, "second", "--image-size", "64")
    assert code == 0 and (second["backend"], second["precision"]) == ("openvino", "int8") and loads == []
    assert f"cached in {converted}" in capsys.readouterr().err
    mask = first["images"][0]["prompts"][0]["files"]["mask"]
    again = second["images"][0]["prompts"][0]["files"]["mask"]
    assert open(mask, "rb").read() == open(again, "rb").read()
    replace_file(mine / "config.json", (mine / "config.json").read_bytes())  # the same bytes, but a new file
    code, third = predict_run(tmp_path, mine, "third", "--image-size", "64")
    assert code == 0 and third["backend"] == "openvino" and loads == [str(mine)] and calls == []
    code, _ = predict_run(tmp_path, mine, "fourth", "--image-size", "64")  # recorded again by the third run
    assert code == 0 and loads == [str(mine)]


def test_source_records_are_untrusted(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path))
    records = tmp_path / "openvino" / "sources"
    records.mkdir(parents=True)
    conversion = "ab" * 32
    (tmp_path / "openvino" / conversion).mkdir()
    (tmp_path / "openvino" / conversion / "manifest.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "manifest.json").write_text("{}")
    for name, content in {
        "damaged": "[not json",
        "list": "[1, 2]",
        "escaping": json.dumps({"conversion": "../../outside"}),
        "absolute": json.dumps({"conversion": str(tmp_path / "outside")}),
        "missing": json.dumps({"conversion": "cd" * 32}),
        "good": json.dumps({"conversion": conversion}),
    }.items():
        (records / f"{name}.json").write_text(content)
    assert recorded_conversion("good") == tmp_path / "openvino" / conversion
    for name in ("damaged", "list", "escaping", "absolute", "missing", "never-recorded", None):
        assert recorded_conversion(name) is None, name


def aged(path: Path, days: float) -> Path:
    """`path` (a file or folder) last modified `days` ago."""
    when = time.time() - days * 86400
    os.utime(path, (when, when))
    return path


def fake_conversion(root: Path, name: str, days: float) -> Path:
    """A folder `name` in the cache's `root` holding 1 MB and a manifest, last modified `days` ago."""
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text("{}")
    (root / name / "image_encoder.bin").write_bytes(bytes(1_000_000))
    return aged(root / name, days)


def test_conversions_unused_for_two_weeks_and_crash_leftovers_are_pruned(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path))
    root = tmp_path / "openvino"
    old, new, just_made, opened = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    for name, days in ((old, 15), (new, 13), (just_made, 30), (opened, 20)):
        fake_conversion(root, name, days)
    fake_conversion(root, f"{old}.partial-x1y2", 2)  # a conversion a crash interrupted
    fake_conversion(root, f"{new}.partial-z3w4", 0.5)  # perhaps another process converting now
    fake_conversion(root, "mine", 100)  # not ours
    (root / ("e" * 64)).symlink_to(root / "mine")
    (root / "sources").mkdir()
    for record, conversion in (("1" * 64, old), ("2" * 64, new), ("3" * 64, opened)):
        (root / "sources" / f"{record}.json").write_text(json.dumps({"conversion": conversion}))
    (root / "sources" / "notes.json").write_text(json.dumps({"conversion": old}))  # not a record of ours
    (root / "sources" / f"{'4' * 64}.json").write_text(json.dumps({"conversion": "../mine"}))
    assert recorded_conversion("3" * 64) == root / opened  # a run opens it: it is used now
    removed = prune_conversions(root, keep=just_made)
    assert sorted(p.name for p in removed) == sorted([old, f"{old}.partial-x1y2", f"{'1' * 64}.json"])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [new, just_made, opened, f"{new}.partial-z3w4", "mine", "e" * 64, "sources"]
    )
    assert sorted(p.name for p in (root / "sources").iterdir()) == sorted(
        [f"{'2' * 64}.json", f"{'3' * 64}.json", f"{'4' * 64}.json", "notes.json"]
    )
    err = capsys.readouterr().err
    assert f"removed 2 cached conversions unused for 14 days or left by a crash (2 MB) from {root}" in err
    assert "removed 1 records of conversions no longer cached (0 MB)" in err
    assert prune_conversions(tmp_path / "missing", keep=old) == []


def fake_hub_repo(hub: "os.PathLike", repo: str, folder, revision: str) -> None:
    """`folder`'s files as revision `revision` of the hub repository `repo` in an HF cache at `hub`, laid out as
    huggingface_hub downloads them (snapshots/<revision>/<file> linking to blobs/<hash>), `main` pointing at it."""
    root = Path(hub) / f"models--{repo.replace('/', '--')}"
    for name in ("blobs", f"snapshots/{revision}", "refs"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for file in Path(folder).iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (root / "snapshots" / revision / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (root / "refs" / "main").write_text(revision)


def test_the_files_a_source_loads_from(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    full = tiny_checkpoint(name="full")
    assert sorted(source_files(str(full))) == sorted(full.iterdir())
    decoder_only = CLIPSeg.from_pretrained(full).save_pretrained(tmp_path / "decoder", decoder_only=True)
    files = source_files(str(decoder_only))
    assert sorted(files) == sorted([*decoder_only.iterdir(), *full.iterdir()])  # its CLIP's too
    original = tmp_path / "rd64-uni.pth"
    original.write_bytes(b"an original decoder")
    assert source_files(str(original), str(full)) == [original, *source_files(str(full))]
    assert source_files(str(original), "random-vit-b16") is None  # drawn anew on every load
    assert source_files(str(tmp_path / "nothing")) is None
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    fake_hub_repo(hub, "owner/tiny", full, "1" * 40)
    snapshot = hub / "models--owner--tiny" / "snapshots" / ("1" * 40)
    assert sorted(source_files("owner/tiny")) == sorted(snapshot.iterdir())
    assert CLIPSeg.from_pretrained("owner/tiny").config.reduce_dim  # what a load of the hub id reads
    before = source_key("owner/tiny", None, "int8")
    assert before == source_key("owner/tiny", None, "int8") and before != source_key("owner/tiny", None, "bf16")
    fake_hub_repo(hub, "owner/tiny", tiny_checkpoint(name="full", seed=1), "2" * 40)  # a new revision downloaded
    assert source_key("owner/tiny", None, "int8") != before
    replace_file(full / "config.json", (full / "config.json").read_bytes())
    key = source_key(str(full), None, "int8")
    replace_file(full / "config.json", (full / "config.json").read_bytes())
    assert source_key(str(full), None, "int8") != key  # a file written again, even with the same bytes
