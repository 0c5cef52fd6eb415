"""export.py, clipseg.onnx.export and clipseg.onnx.backend: the ONNX graphs against PyTorch, the manifest,
predict.py --backend onnx.

The export (about 40 s on 2 cores: torch.export traces four graphs) runs once per module, through export.py's CLI.
Needs requirements-export.txt (`make test` installs it); skipped with a message elsewhere, never in CI.
"""

import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import require_modules, write_inputs
from PIL import Image

require_modules(("onnx", "onnxscript", "onnxruntime"), "requirements-export.txt")

from clipseg import outputs  # noqa: E402
from clipseg.onnx import export as onnx_export  # noqa: E402
from clipseg.onnx.backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackendError, OnnxCLIPSeg  # noqa: E402
from clipseg.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from export import main as export_main  # noqa: E402
from model import CLIPSeg  # noqa: E402
from predict import main as predict_main  # noqa: E402

PHRASES = ["a red circle", "the big blue square on the left", "sky"]
TOLERANCE = 1e-4  # the bound on |ONNX logits - PyTorch logits|
THRESHOLD = 0.6  # the refined tiny model's probabilities centre above 0.5: a threshold that splits its maps


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint):
    """With the refined head, the released models' (conftest's `model` is then built from it too)."""
    return tiny_checkpoint(refined=True)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """export.py into a folder that does not exist yet (created, as every command's --out)."""
    out = tmp_path_factory.mktemp("onnx") / "new" / "exported"
    assert export_main([str(tiny_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runner(exported):
    return OnnxCLIPSeg(exported)


@pytest.mark.parametrize("size", [(64, 96), (112, 48), (64, 64)])  # the last is CLIP's own 4 x 4 grid
@pytest.mark.parametrize("prompts", [1, 3])
def test_onnx_logits_match_pytorch(model, runner, size, prompts):
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        expected = model.decode(model.encode_image(pixels), model.embed_text(PHRASES[:prompts]))
    got = runner.decode(runner.encode_image(pixels), runner.embed_text(PHRASES[:prompts]))
    assert got.shape == expected.shape == (prompts, 1, *size)
    assert (got - expected).abs().max() <= TOLERANCE


def test_onnx_batches_text_and_image_prompts_match_pytorch(model, runner):
    pixels = torch.randn(3, 3, 80, 48, generator=torch.Generator().manual_seed(0))
    ids, mask = model.tokenize(PHRASES)  # padded to the longest phrase
    prompt_images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, conditional = model.encode_image(pixels), model.embed_token_ids(ids, mask)
        expected_images = model.embed_images(prompt_images)
        expected = model.decode(features, conditional)  # one prompt per image
    ours = runner.encode_image(pixels)
    assert ours.grid == features.grid == (5, 3)
    for theirs, reference in zip(ours.activations, features.activations):
        assert theirs.shape == reference.shape and (theirs - reference).abs().max() <= TOLERANCE
    assert (runner.embed_token_ids(ids, mask) - conditional).abs().max() <= TOLERANCE
    assert (runner.embed_images(prompt_images) - expected_images).abs().max() <= TOLERANCE
    assert (runner.decode(ours, conditional) - expected).abs().max() <= TOLERANCE


def test_manifest_describes_the_graphs(exported, model):
    manifest = json.loads((exported / MANIFEST_NAME).read_text())
    assert manifest["opset"] == onnx_export.OPSET == 20
    assert {name: graph["file"] for name, graph in manifest["graphs"].items()} == GRAPH_FILES
    assert all((exported / file).is_file() for file in GRAPH_FILES.values())
    encoder, decoder = manifest["graphs"]["image_encoder"], manifest["graphs"]["decoder"]
    batch, channels, height, width = encoder["inputs"]["pixel_values"]["shape"]
    assert channels == 3 and all(isinstance(d, str) for d in (batch, height, width))  # dynamic sizes
    assert list(encoder["outputs"]) == ["activation_1", "activation_3", "activation_4"]
    assert list(decoder["inputs"]) == ["grid", "conditional", *encoder["outputs"]]
    assert isinstance(decoder["inputs"]["conditional"]["shape"][0], str)  # any number of prompts
    assert decoder["inputs"]["activation_1"]["shape"][0] == 1  # one image's features
    assert list(manifest["graphs"]["text_encoder"]["inputs"]) == ["input_ids", "attention_mask"]
    assert manifest["config"] == json.loads(json.dumps(model.config.to_hf_dict()))
    assert manifest["extract_layers"] == [1, 3, 4] and manifest["image_size"] == 352
    assert manifest["normalisation"]["mean"] == list(IMAGENET_MEAN)
    assert manifest["normalisation"]["std"] == list(IMAGENET_STD)
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}
    checks = manifest["difference_to_torch"]
    assert len(checks) == 6 and 0 < max(check["absolute"] for check in checks.values()) <= TOLERANCE


def test_plain_head_decoder_exports_too(tmp_path):
    torch.manual_seed(0)
    plain = CLIPSeg.from_backbone("tiny").eval()
    onnx_export.export_decoder(plain, tmp_path)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / GRAPH_FILES["decoder"]), providers=["CPUExecutionProvider"])
    for size, prompts in [((64, 96), 1), ((48, 80), 4)]:
        with torch.no_grad():
            features = plain.encode_image(torch.randn(1, 3, *size))
            conditional = torch.randn(prompts, plain.config.clip.projection_dim)
            expected = plain.decode(features, conditional).numpy()
        feed = {"grid": np.array(features.grid), "conditional": conditional.numpy()}
        feed |= {name: a.numpy() for name, a in zip(onnx_export.activation_names(plain), features.activations)}
        assert np.abs(session.run(None, feed)[0] - expected).max() <= TOLERANCE


# ------------------------------------------------------------------------------------- predict.py --backend onnx


def test_predict_backend_onnx_writes_the_same_outputs_as_torch(tiny_dir, exported, tmp_path):
    folder, visual = write_inputs(tmp_path)
    common = [str(folder), "--prompt", PHRASES[0], "--prompt", PHRASES[1], "--visual-prompt", visual]
    common += ["--image-size", "64", "--prob-bits", "16", "--threshold", str(THRESHOLD)]
    assert predict_main([*common, "--model", str(tiny_dir), "--precision", "fp32", "--out", str(tmp_path / "t")]) == 0
    assert predict_main([*common, "--backend", "onnx", "--model", str(exported), "--out", str(tmp_path / "o")]) == 0
    torch_summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    onnx_summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (onnx_summary["backend"], onnx_summary["precision"], onnx_summary["processed"]) == ("onnx", "fp32", 2)
    positive = []
    for torch_image, onnx_image in zip(torch_summary["images"], onnx_summary["images"]):
        assert torch_image["inference_size"] == onnx_image["inference_size"]
        assert len(torch_image["prompts"]) == len(onnx_image["prompts"]) == 3
        for want, got in zip(torch_image["prompts"], onnx_image["prompts"]):
            files = {
                kind: path.replace(str(tmp_path / "t"), str(tmp_path / "o")) for kind, path in want["files"].items()
            }
            assert got["files"] == files  # the same file names
            theirs, ours = (np.asarray(Image.open(p["files"]["probability"])) / 65535 for p in (got, want))
            assert np.abs(theirs - ours).max() <= TOLERANCE + 1 / 65535
            positive.append((ours > THRESHOLD).mean())
            mask_theirs, mask_ours = (np.asarray(Image.open(p["files"]["mask"])) for p in (got, want))
            near = np.abs(ours - THRESHOLD) < 2 * TOLERANCE  # within rounding of the threshold either way is right
            assert np.array_equal(mask_theirs[~near], mask_ours[~near])
    assert 0.05 < np.mean(positive) < 0.95  # masks with both sides: the comparison means something


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "onnx"], "--backend onnx needs --model EXPORT_DIR"),
        (["--backend", "onnx", "--model", "x", "--precision", "int8"], "--precision int8 is for --backend torch"),
        (["--backend", "onnx", "--model", "x", "--amp"], "--amp is for --backend torch"),
        (["--backend", "onnx", "--model", "x", "--device", "cuda"], "runs on the CPU (onnxruntime)"),
    ],
)
def test_predict_backend_onnx_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        predict_main([str(tmp_path / "x.png"), "--prompt", "a", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_onnxruntime_or_export_is_a_clear_error(exported, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    cli = [str(tmp_path / "img.png"), "--prompt", "a", "--backend", "onnx", "--out", str(tmp_path / "out")]
    assert predict_main([*cli, "--model", str(tmp_path)]) == 2  # a folder export.py did not write
    assert (
        "no manifest.json; write the folder with `python export.py --model MODEL --out DIR`" in capsys.readouterr().err
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert predict_main([*cli, "--model", str(exported)]) == 2
    assert (
        "needs onnxruntime, which is not installed: pip install -r requirements-export.txt" in capsys.readouterr().err
    )
    with pytest.raises(OnnxBackendError, match="requirements-export.txt"):
        onnx_export.export(CLIPSeg.from_backbone("tiny"), tmp_path / "never")


def test_runner_rejects_what_it_cannot_run(runner):
    with pytest.raises(ValueError, match="runs on the CPU"):
        runner.to("cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        runner.encode_image(torch.zeros(1, 3, 40, 64))
    features = runner.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        runner.decode(features, torch.zeros(3, runner.config.clip.projection_dim))


def test_an_unwritable_export_folder_stops_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CLIPSeg, "from_pretrained", lambda *a, **k: pytest.fail("loaded before out_dir was checked"))
    (tmp_path / "a_file").write_text("in the way")
    for argv in (["some/model", str(tmp_path / "a_file" / "export")], ["--out", str(tmp_path / "a_file")]):
        assert export_main(argv) == 2 and "a_file is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- an export is untrusted


def export_copy(exported, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    return copy


def rewrite_manifest(directory, edit):
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    edit(manifest)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_manifest_records_each_graphs_sha256(exported):
    manifest = json.loads((exported / MANIFEST_NAME).read_text())
    for name, file in GRAPH_FILES.items():
        assert manifest["graphs"][name]["sha256"] == hashlib.sha256((exported / file).read_bytes()).hexdigest()


def test_a_swapped_decoder_with_the_same_inputs_and_outputs_is_refused(exported, tmp_path, capsys):
    copy = export_copy(exported, tmp_path)
    torch.manual_seed(7)
    onnx_export.export_decoder(CLIPSeg.from_backbone("tiny", refined=True).eval(), copy)  # valid, other weights
    ours, theirs = (onnx_export.graph_signature(folder / "decoder.onnx") for folder in (copy, exported))
    assert (ours["inputs"], ours["outputs"]) == (theirs["inputs"], theirs["outputs"])
    with pytest.raises(OnnxBackendError, match=rf"{copy / 'decoder.onnx'}: its SHA-256 .* is not the .* manifest"):
        OnnxCLIPSeg(copy)
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    cli = [str(tmp_path / "img.png"), "--prompt", "a", "--backend", "onnx", "--model", str(copy)]
    assert predict_main([*cli, "--out", str(tmp_path / "out")]) == 2
    assert "decoder.onnx: its SHA-256" in capsys.readouterr().err


def test_two_graphs_swapped_with_their_recorded_sha256s_are_refused_when_opened(exported, tmp_path):
    copy = export_copy(exported, tmp_path)
    (copy / "decoder.onnx").rename(copy / "swap")
    (copy / "text_encoder.onnx").rename(copy / "decoder.onnx")
    (copy / "swap").rename(copy / "text_encoder.onnx")

    def swap(manifest: dict) -> None:
        graphs = manifest["graphs"]
        graphs["decoder"], graphs["text_encoder"] = graphs["text_encoder"], graphs["decoder"]

    rewrite_manifest(copy, swap)
    with pytest.raises(OnnxBackendError, match=r"text_encoder.onnx: takes the inputs .* not those of the text encoder"):
        OnnxCLIPSeg(copy)


def test_a_graph_onnxruntime_cannot_load_is_a_message(exported, tmp_path):
    copy = export_copy(exported, tmp_path)
    (copy / "text_encoder.onnx").write_bytes(b"not a protobuf" * 100)
    digest = hashlib.sha256((copy / "text_encoder.onnx").read_bytes()).hexdigest()
    rewrite_manifest(copy, lambda manifest: manifest["graphs"]["text_encoder"].update(sha256=digest))
    with pytest.raises(OnnxBackendError, match=rf"{copy / 'text_encoder.onnx'}: onnxruntime cannot load it"):
        OnnxCLIPSeg(copy)


def outside_reference_graph(location: str):
    """A graph whose one initializer is read from `location` (ONNX external data)."""
    import onnx

    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4])
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        weight.external_data.add(key=key, value=value)
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [], [output], [weight])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)])


@pytest.mark.parametrize("location", ["../outside.bin", "{outside}", "link.bin"])
def test_external_data_outside_the_export_is_never_read(exported, tmp_path, location):
    """A whole export folder from a stranger, its manifest hashes matching: a graph that reads weights from a file
    outside the folder (relative, absolute or through a symbolic link) is refused by onnxruntime."""
    copy = export_copy(exported, tmp_path)
    outside = tmp_path / "outside.bin"
    np.arange(4, dtype=np.float32).tofile(outside)
    (copy / "link.bin").symlink_to(outside)
    graph = outside_reference_graph(location.format(outside=outside))
    (copy / "image_encoder.onnx").write_bytes(graph.SerializeToString())
    digest = hashlib.sha256((copy / "image_encoder.onnx").read_bytes()).hexdigest()
    rewrite_manifest(copy, lambda manifest: manifest["graphs"]["image_encoder"].update(sha256=digest))
    with pytest.raises(OnnxBackendError, match="image_encoder.onnx: onnxruntime cannot load it .*External data path"):
        OnnxCLIPSeg(copy)


MANIFEST_DAMAGE = {
    "an older export without hashes": (
        lambda m: m.update(format_version=1) or [g.pop("sha256") for g in m["graphs"].values()],
        "format 'clipseg-onnx' version 1, this code reads 'clipseg-onnx' version 2; export the model again",
    ),
    "a hash missing": (lambda m: m["graphs"]["decoder"].pop("sha256"), "no SHA-256 for the decoder graph"),
    "a hash that is not one": (lambda m: m["graphs"]["decoder"].update(sha256="abc"), "no SHA-256 for the decoder"),
    "graphs not an object": (lambda m: m.update(graphs=[1, 2]), "no SHA-256 for the image_encoder graph"),
    "a graph entry not an object": (lambda m: m["graphs"].update(decoder="x"), "no SHA-256 for the decoder graph"),
    "no config": (lambda m: m.pop("config"), "no model config"),
    "a config of another patch size": (
        lambda m: (
            m["config"]["vision_config"].update(patch_size=32)  # images were resized for 32-px patches
            or m["config"].update(use_complex_transposed_convolution=False)
        ),  # a plain head takes any patch size
        "its config does not describe the graphs (patch_size 32, the graphs cut 16-px patches)",
    ),
    "a config of another projection": (
        lambda m: m["config"].update(projection_dim=128),  # a ValueError traceback at the first prediction
        "its config does not describe the graphs (projection_dim 128, the decoder takes 64)",
    ),
    "a config reading other layers": (
        lambda m: m["config"].update(extract_layers=[1, 3]),
        "its config does not describe the graphs (2 extract_layers, the image encoder gives 3)",
    ),
    "config values out of range": (
        lambda m: m["config"]["vision_config"].update(num_attention_heads=0),
        "manifest.json: vision_config.num_attention_heads = 0 is out of range",
    ),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_missing_or_malformed_manifest_is_refused(exported, tmp_path, damage):
    copy = export_copy(exported, tmp_path)
    edit, message = MANIFEST_DAMAGE[damage]
    rewrite_manifest(copy, edit)
    with pytest.raises(OnnxBackendError, match=re.escape(message)):
        OnnxCLIPSeg(copy)


@pytest.mark.parametrize(("text", "message"), [("[1, 2]", "expected a JSON object"), ("{", "not valid JSON")])
def test_a_manifest_that_is_not_a_json_object_is_refused(exported, tmp_path, text, message):
    copy = export_copy(exported, tmp_path)
    (copy / MANIFEST_NAME).write_text(text)
    with pytest.raises(OnnxBackendError, match=f"{copy / MANIFEST_NAME}: {message}"):
        OnnxCLIPSeg(copy)


def test_export_checks_the_disk_space_of_its_output_folder_before_the_work(tiny_dir, tmp_path, monkeypatch, capsys):
    exported_graphs = []
    monkeypatch.setattr(onnx_export, "export_graph", lambda *args: exported_graphs.append(args))
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**5))
    assert export_main([str(tiny_dir), str(tmp_path / "full")]) == 2
    assert f"not enough disk space for {tmp_path / 'full'}: the export needs about" in capsys.readouterr().err
    assert exported_graphs == []


def folder_bytes(folder) -> dict:
    """The files of `folder` by name (a folder inside it: None)."""
    return {path.name: path.read_bytes() if path.is_file() else None for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("failure", ["the check fails", "killed while exporting"])
def test_a_failed_export_into_an_export_folder_leaves_the_old_export_whole(
    exported, tiny_dir, tmp_path, monkeypatch, capsys, failure
):
    """The new graphs are written and checked beside the old ones (a hidden staging folder) and moved into place
    only once they pass: the export a user already has keeps working whatever stops the new one."""
    copy = export_copy(exported, tmp_path)
    before = folder_bytes(copy)
    if failure == "the check fails":
        monkeypatch.setattr(onnx_export, "verify", lambda *args: {"logits": {"relative": 1.0, "absolute": 1.0}})
        assert export_main([str(tiny_dir), str(copy)]) == 1
        assert f"nothing was written to {copy}" in capsys.readouterr().err
    else:

        def killed(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(onnx_export, "export_decoder", killed)
        with pytest.raises(KeyboardInterrupt):
            onnx_export.export(CLIPSeg.from_pretrained(tiny_dir), copy)
    assert folder_bytes(copy) == before  # the staging folder removed too
    OnnxCLIPSeg(copy)


def test_an_export_refuses_a_folder_in_the_way_and_another_export_at_work_before_touching_the_old_one(
    exported, tiny_dir, tmp_path, capsys
):
    import fcntl

    copy = export_copy(exported, tmp_path)
    (copy / ".export-in-progress-x1y2").mkdir()  # a killed export's leftovers
    (copy / ".export-in-progress-x1y2" / "decoder.onnx").write_bytes(b"half")
    before = {name: data for name, data in folder_bytes(copy).items() if data is not None}
    handle = os.open(copy, os.O_RDONLY)  # another export holds the folder
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert export_main([str(tiny_dir), str(copy)]) == 2
        assert f"{copy}: another export is writing there; wait for it to end" in capsys.readouterr().err
    finally:
        os.close(handle)
    (copy / "decoder.onnx").unlink()
    (copy / "decoder.onnx").mkdir()  # a folder where a graph goes: the moves would stop halfway
    assert export_main([str(tiny_dir), str(copy)]) == 2
    assert f"{copy / 'decoder.onnx'} is a folder in the way of the export's file decoder.onnx" in (
        capsys.readouterr().err
    )
    (copy / "decoder.onnx").rmdir()
    assert export_main([str(tiny_dir), str(copy)]) == 0
    assert sorted(folder_bytes(copy)) == sorted(before)  # the leftovers removed, the files in place
    OnnxCLIPSeg(copy)
