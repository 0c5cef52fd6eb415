"""predict.py: the CLI's files, summary, skips, exit codes and errors, against the Predictor's maps."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    NASTY_PROMPTS,
    folder_files,
    random_image,
    require,
    run_command,
    scene,
    strict_json,
    vision_tower_calls,
    write_support,
)
from PIL import Image
from scipy import ndimage

from clipseg import folder_prediction, images
from clipseg.predictor import Predictor
from model import CLIPSeg
from predict import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 64  # short side used in these tests (the tiny CLIP takes any multiple of 16)
PHRASES = ["a red circle", "the blue square", "sky"]


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
    assert len(list((out / "photo.jpg").iterdir())) == 3 * 3 + 1


def test_an_image_whose_name_is_not_utf8_gets_its_outputs_and_the_summary(tiny_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    random_image(40, 30).save(folder / os.fsdecode(b"bad\xffname.png"))
    out = tmp_path / "out"
    assert run_cli(tiny_dir, [folder], out, "--prompt", PHRASES[0]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    (entry,) = summary["images"]
    assert summary["processed"] == 1 and os.fsencode(entry["image"]).endswith(b"bad\xffname.png")
    assert Path(entry["prompts"][0]["files"]["mask"]).is_file()


def test_a_run_without_readable_images_records_the_threshold_it_was_given(tiny_dir, tmp_path):
    """The summary of a run with no readable input is written before the model loads: a given threshold in the
    form predict.py and the app always write, no threshold (null) when none was given."""
    for extra, expected in (
        (["--threshold", "0.4"], {"value": 0.4, "source": "given", "note": "threshold 0.4 (given)"}),
        ([], None),
    ):
        out = tmp_path / f"out{len(extra)}"
        assert run_cli(tiny_dir, [tmp_path / "missing.png"], out, "--prompt", "sky", *extra) == 1
        assert json.loads((out / "summary.json").read_text())["threshold"] == expected


def test_the_tile_hint_for_large_images_is_said_once_and_counted(tiny_dir, tmp_path, capsys):
    """With a small model every photo is "much larger than the model's input": the note came once per image, inside
    the progress bar."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(300, 280, seed=i).save(folder / f"big{i}.png")
    random_image(40, 30).save(folder / "small.png")
    assert run_cli(tiny_dir, [folder], tmp_path / "out", "--prompt", "sky") == 0
    err = capsys.readouterr().err
    assert err.count("--tile may find small objects") == 1
    assert "processed 4 image(s), skipped 0; 3 much larger than the model's input, --tile may help" in err


def test_out_in_the_folder_of_the_images_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    random_image(40, 30).save(tmp_path / "cat.png")
    for given in (tmp_path, tmp_path / "cat.png"):
        assert run_cli(tiny_dir, [given], tmp_path, "--prompt", "sky") == 2
        assert f"--out {tmp_path} is the folder of the input {given}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]


def test_a_summary_that_would_overwrite_an_image_or_a_file_of_the_run_is_refused_before_any_work(
    tiny_dir, tmp_path, capsys
):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    random_image(40, 30).save(photos / "cat.png")
    (photos / "cat").symlink_to(photos / "cat.png")
    image_bytes = (photos / "cat.png").read_bytes()
    for summary, message in (
        (photos / "cat.png", "names an image: the summary is JSON"),
        (photos / "cat", "names an image: the summary is JSON"),  # the input itself, by another name
        (tmp_path / "new.PNG", "names an image: the summary is JSON"),
        (out / "run.json", "is the run's own run.json in --out"),
        (out / "summary.jsonl", "is the run's own summary.jsonl in --out"),
        (out / "cat.png" / "s.json", "lies in a subfolder of --out, where the images' output folders go"),
    ):
        inputs = [photos / "cat"] if summary.name == "cat" else [photos]
        assert run_cli(tiny_dir, inputs, out, "--prompt", "sky", "--summary", str(summary)) == 2
        assert f"--summary {summary} {message}" in capsys.readouterr().err
    assert (photos / "cat.png").read_bytes() == image_bytes and not out.exists()
    assert run_cli(tiny_dir, [photos], out, "--prompt", "sky", "--summary", str(out / "summary.json")) == 0
    assert run_cli(tiny_dir, [photos], out, "--prompt", "sky", "--summary", str(tmp_path / "mine.json")) == 0
    assert json.loads((tmp_path / "mine.json").read_text())["processed"] == 1


def test_images_named_like_the_runs_own_files_get_other_folders(tiny_dir, tmp_path):
    for name in ("summary.jsonl", "summary.json", "run.json", "coco.json"):
        random_image(40, 30).save(tmp_path / name, format="PNG")  # a PNG whatever its name says
        out = tmp_path / f"out-{name.split('.')[0]}-{len(name)}"
        assert run_cli(tiny_dir, [tmp_path / name], out, "--prompt", "sky", "--coco", "rle") == 0, name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["processed"] == 1 and summary["skipped"] == 0, name
        assert json.loads((out / "coco.json").read_text())["images"] and (out / "run.json").is_file()


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
    assert len(list((out / "img.png").glob("*.prob.png"))) == len(NASTY_PROMPTS)
    summary = json.loads((out / "summary.json").read_text())
    assert [p["prompt"] for p in summary["images"][0]["prompts"]] == NASTY_PROMPTS


def test_cli_argument_errors(tiny_dir, tmp_path, capsys):
    random_image(32, 32).save(tmp_path / "img.png")
    for bad, message in [
        ([], "at least one --prompt"),
        (
            ["--visual-prompt", f"{tmp_path / 'img.png'}:{tmp_path / 'nope.png'}"],
            f"(no such file: {tmp_path / 'nope.png'})",
        ),
        (["--prompt", "a", "--threshold", "1.5"], "threshold"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "img.png"), "--model", str(tiny_dir), *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    Image.fromarray(np.ones((5, 5), dtype=np.uint8) * 255).save(tmp_path / "small_mask.png")
    spec = f"{tmp_path / 'img.png'}:{tmp_path / 'small_mask.png'}"
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--visual-prompt", spec) == 2
    assert "support image's size" in capsys.readouterr().err
    Image.open(tmp_path / "img.png").convert("L").point(lambda _: 0).save(tmp_path / "black_mask.png")
    spec = f"{tmp_path / 'img.png'}:{tmp_path / 'black_mask.png'}"
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--visual-prompt", spec) == 2
    assert "error: --visual-prompt: the support mask has no object" in capsys.readouterr().err
    assert run_cli(tmp_path / "no_model", [tmp_path / "img.png"], tmp_path / "out", "--prompt", "a") == 2
    assert f"error: {tmp_path / 'no_model'}: no such directory or file. Runs in checkpoints/" in capsys.readouterr().err
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "a", "--image-size", "50") == 2
    assert "image size 50 is not a multiple of the patch size 16 of tiny: use 48 or 64" in capsys.readouterr().err


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


def test_cli_int8_on_a_model_that_overflows_inside_the_vision_tower_stops_with_the_same_message(tmp_path, capsys):
    """int8 quantises each linear layer's input to 8 bits from its range, which infinite values do not have."""
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", image_size=64)
    with torch.no_grad():
        model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.fill_(3e38)
    checkpoint = model.save_pretrained(tmp_path / "diverged")
    scene(80, 60).save(tmp_path / "img.png")
    out = tmp_path / "out"
    assert run_cli(checkpoint, [tmp_path / "img.png"], out, "--prompt", "sky", "--precision", "int8") == 2
    error = capsys.readouterr().err
    assert "error: stopped after 0 image(s): the model's output holds" in error and "Traceback" not in error


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
    assert len(list((out / "img.png").glob("*.prob.png"))) == 2


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
    assert [e["image"] for e in summary["errors"]].count(str(folder / "loop.jpg")) == 1  # listed and given: once
    assert summary["processed"] == 1 and summary["skipped"] == 4
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

    def disk_full(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(folder_prediction, "atomic_write", disk_full)
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky") == 1
    captured = capsys.readouterr()
    assert "error: cannot write the summary" in captured.err and "No space left on device" in captured.err
    assert strict_json(captured.out)["images"][0]["prompts"][0]["prompt"] == "sky"


# ---------------------------------------------------------------------------------------- folders, torchrun


def photo_folder(tmp_path: Path, n: int = 12) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        random_image(40 + 8 * (i % 3), 32, seed=i).save(folder / f"img{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def summary_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_writes_the_same_files_as_one_process_each_image_once(tiny_dir, tmp_path):
    folder = photo_folder(tmp_path)
    outputs = {}
    for nproc in (None, 2):
        cwd = tmp_path / f"run{nproc}"  # --out "out" inside: the summaries name the same files
        cwd.mkdir()
        argv = [
            folder,
            "--model",
            tiny_dir,
            "--image-size",
            SIZE,
            "--prompt",
            "sky",
            "--prompt",
            "a dog",
            "--coco",
            "rle",
        ]
        done = run_command("predict.py", [*argv, "--out", "out", "--precision", "fp32", "--device", "cpu"], cwd, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("processed 12 image(s), skipped 1") == 1  # reported once, by rank 0
        outputs[nproc] = folder_files(cwd / "out")
    assert outputs[2] == outputs[None]  # maps, masks, overlays, summary.jsonl, summary.json, run.json, coco.json
    coco = json.loads(outputs[2]["coco.json"])
    assert len(coco["images"]) == 12 and coco["annotations"]  # every rank's images, gathered by rank 0
    lines = summary_lines(tmp_path / "run2" / "out")
    assert [line["image"] for line in lines] == sorted(str(p) for p in folder.iterdir())  # each input once
    assert not list((tmp_path / "run2" / "out").glob("summary-rank*"))  # the ranks' files were merged


KILLER = """
import os, sys
from clipseg import folder_prediction
real, written = folder_prediction.write_image_outputs, []

def write_then_die(image, probs, prompts, folder, *args):
    if len(written) == 5:  # the 6th image: one file written, then the process is killed
        probs[0:1].dump(folder.mkdir(parents=True, exist_ok=True) or folder / "sky.prob.png")
        os._exit(9)
    written.append(folder)
    return real(image, probs, prompts, folder, *args)

folder_prediction.write_image_outputs = write_then_die
sys.argv = ["predict.py", *sys.argv[1:]]
import runpy
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "predict.py"), run_name="__main__")
"""


def test_a_killed_run_resumes_without_redoing_completed_images(tiny_dir, tmp_path, monkeypatch, capsys):
    folder, out = photo_folder(tmp_path), tmp_path / "out"
    argv = [folder, "--model", tiny_dir, "--image-size", SIZE, "--out", out, "--prompt", "sky", "--precision", "fp32"]
    (tmp_path / "kill.py").write_text(KILLER)
    killed = run_command(tmp_path / "kill.py", [*argv, "--batch-size", "2"], tmp_path)
    assert killed.returncode == 9, killed.stderr[-3000:]
    done_before = [json.loads(line)["image"] for line in (out / "summary-rank0.jsonl").read_text().splitlines()]
    assert len([key for key in done_before if "broken" not in key]) == 5 and not (out / "summary.json").exists()
    (half_written,) = {path.name for path in out.iterdir() if path.is_dir()} - {Path(k).name for k in done_before}
    redone, real = [], folder_prediction.write_image_outputs

    def count_and_write(image, probs, prompts, folder, *args):
        redone.append(folder)
        return real(image, probs, prompts, folder, *args)

    monkeypatch.setattr(folder_prediction, "write_image_outputs", count_and_write)
    assert main([*map(str, argv), "--resume"]) == 0
    assert len(redone) == 12 - 5  # the half-written 6th image and the 6 never started
    assert "processed 12 image(s) (7 now, 5 done before), skipped 1" in capsys.readouterr().err
    assert not {folder.name for folder in redone} & {Path(key).name for key in done_before}
    lines = summary_lines(out)
    assert [line["image"] for line in lines] == sorted(str(p) for p in folder.iterdir())  # each image once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == 12 and summary["skipped"] == 1
    with Image.open(out / half_written / "sky.prob.png") as redone_png:  # the half-written file was replaced
        assert redone_png.size == Image.open(folder / half_written).size


def test_resume_does_again_an_image_replaced_since_its_line_was_written(tiny_dir, tmp_path, capsys):
    """The summary records each image file's size and modification time: a file replaced by another picture under
    the same name is segmented again (its 60x40 mask and summary were kept for a 1000x1000 picture)."""
    folder, out = photo_folder(tmp_path, n=2), tmp_path / "out"
    assert run_cli(tiny_dir, [folder], out, "--prompt", "sky") == 0
    replaced = folder / "img01.png"
    random_image(64, 48, seed=9).save(replaced)
    os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert run_cli(tiny_dir, [folder], out, "--prompt", "sky", "--resume") == 0
    assert "processed 2 image(s) (1 now, 1 done before), skipped 1" in capsys.readouterr().err
    entry = next(e for e in json.loads((out / "summary.json").read_text())["images"] if e["image"] == str(replaced))
    assert (entry["width"], entry["height"]) == (64, 48)
    assert entry["input_file"] == {"bytes": replaced.stat().st_size, "mtime_ns": replaced.stat().st_mtime_ns}
    with Image.open(out / "img01.png" / "sky.mask.png") as mask:
        assert mask.size == (64, 48)


def test_resume_with_other_inputs_says_where_the_summarys_other_images_come_from(tiny_dir, tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second, out = photo_folder(tmp_path / "a", n=2), photo_folder(tmp_path / "b", n=1), tmp_path / "out"
    assert run_cli(tiny_dir, [first], out, "--prompt", "sky") == 0
    assert run_cli(tiny_dir, [second], out, "--prompt", "sky", "--resume") == 0
    assert f"processed 3 image(s) (1 now, 0 done before; 2 from earlier runs into {out} with other inputs)" in (
        capsys.readouterr().err
    )


def test_resume_with_other_flags_stops_instead_of_mixing_outputs(tiny_dir, tmp_path, capsys):
    folder, out = photo_folder(tmp_path, n=2), tmp_path / "out"
    assert run_cli(tiny_dir, [folder], out, "--prompt", "sky") == 0
    assert run_cli(tiny_dir, [folder], out, "--prompt", "sky", "--threshold", "0.5", "--resume") == 2
    err = capsys.readouterr().err
    assert "error: --resume: " in err and "(threshold differ; see " in err and "choose another --out" in err
    (out / "run.json").write_text("[1]")
    assert run_cli(tiny_dir, [folder], out, "--prompt", "sky", "--resume") == 2
    assert f"error: --resume: {out / 'run.json'} is not a JSON object" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- masks


EIGHT = np.ones((3, 3), dtype=bool)  # 8-connected components, as the library's


def read_mask(path) -> np.ndarray:
    return np.asarray(Image.open(path)) == 255


def sky_run(tiny_dir, tmp_path: Path, name: str, *flags) -> tuple[dict, np.ndarray]:
    """predict.py on tmp_path/img.png with --prompt sky and `flags`, into tmp_path/name: the prompt's summary entry
    and its mask.png."""
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / name, "--prompt", "sky", *flags) == 0
    entry = json.loads((tmp_path / name / "summary.json").read_text())["images"][0]["prompts"][0]
    return entry, read_mask(entry["files"]["mask"])


def test_cli_expression_prompts_give_the_soft_logic_maps_and_their_masks(tiny_dir, model, tmp_path):
    random_image(72, 48, seed=3).save(tmp_path / "img.png")
    out, expressions = tmp_path / "out", ["sky | a dog", "(sky - a dog:1.5) & red"]
    args = [arg for e in expressions for arg in ("--prompt", e)]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *args, "--threshold", "0.5", "--prob-bits", "16") == 0
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(tmp_path / "img.png")
    sky, dog, red = predictor.predict(phrases=["sky", "a dog", "red"])
    expected = [np.maximum(sky, dog), np.minimum(np.minimum(sky, 1 - np.clip(1.5 * dog, 0, 1)), red)]
    (entry,) = json.loads((out / "summary.json").read_text())["images"]
    for prompt, text, probs in zip(entry["prompts"], expressions, expected):
        assert prompt["prompt"] == text and prompt["expression"]["phrases"] == sorted(
            prompt["expression"]["phrases"], key=["sky", "a dog", "red"].index
        )
        written = np.asarray(Image.open(prompt["files"]["probability"])) / 65535
        assert np.abs(written - probs).max() <= 1e-4
        clear = np.abs(probs - 0.5) > 1e-5  # pixels a rounding difference cannot flip
        mask = read_mask(prompt["files"]["mask"])
        np.testing.assert_array_equal(mask[clear], (probs > 0.5)[clear])
    assert 0 < read_mask(entry["prompts"][0]["files"]["mask"]).mean() < 1
    assert not np.allclose(expected[1], np.minimum(sky, red), atol=1e-3)  # the subtraction mattered
    assert entry["prompts"][0]["expression"]["expression"] == "sky | a dog"


def test_cli_post_processing_changes_the_mask_files_as_make_mask_does(tiny_dir, model, tmp_path):
    from clipseg.postprocess import MaskOptions, make_mask

    random_image(80, 64, seed=5).save(tmp_path / "img.png")
    out, args = tmp_path / "out", ["--prompt", "sky", "--threshold", "0.6", "--grow", "2", "--fill-holes"]
    args += ["--feather", "3", "--save", "prob,mask,soft,cutout"]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *args) == 0
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(tmp_path / "img.png")
    (probs,) = predictor.predict(phrases=["sky"])
    expected = make_mask(probs, MaskOptions(0.6, grow=2, fill_holes=True, feather=3.0))
    files = json.loads((out / "summary.json").read_text())["images"][0]["prompts"][0]["files"]
    assert set(files) == {"probability", "mask", "soft", "cutout"}  # no overlay: not in --save
    mask = read_mask(files["mask"])
    np.testing.assert_array_equal(mask, expected.mask)
    assert not np.array_equal(mask, probs > 0.6)  # the options changed the mask
    soft = np.asarray(Image.open(files["soft"])) / 255
    assert np.abs(soft - expected.soft).max() <= 1 / 255 and 0 < soft[(soft > 0) & (soft < 1)].size
    cut = Image.open(files["cutout"])
    assert cut.mode == "RGBA" and np.abs(np.asarray(cut)[..., 3] / 255 - expected.soft).max() <= 1 / 255
    assert sorted(p.name for p in (out / "img.png").iterdir()) == [
        f"sky.{k}.png" for k in ("cutout", "mask", "prob", "soft")
    ]


def test_cli_threshold_defaults_to_the_models_calibrated_one_else_the_papers(tiny_dir, model, tmp_path, capsys):
    calibrated = tmp_path / "calibrated"
    CLIPSeg.from_pretrained(tiny_dir).save_pretrained(calibrated)
    config = json.loads((calibrated / "config.json").read_text())
    config |= {"clipseg_threshold": 0.62, "clipseg_threshold_origin": "validation mIoU of run test"}
    (calibrated / "config.json").write_text(json.dumps(config))
    random_image(64, 48, seed=7).save(tmp_path / "img.png")
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(tmp_path / "img.png")
    (probs,) = predictor.predict(phrases=["sky"])
    for checkpoint, value, source in [(calibrated, 0.62, "calibrated"), (tiny_dir, 0.3, "paper")]:
        out = tmp_path / source
        assert run_cli(checkpoint, [tmp_path / "img.png"], out, "--prompt", "sky") == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["threshold"]["value"] == value and summary["threshold"]["source"] == source
        assert summary["pipeline"]["mask"]["threshold"] == value
        err = capsys.readouterr().err
        note = {"calibrated": "(calibrated, from the model", "paper": "(the CLIPSeg paper's"}[source]
        assert err.count(f"threshold {value:g} {note}") == 1
        mask = read_mask(summary["images"][0]["prompts"][0]["files"]["mask"])
        clear = np.abs(probs - value) > 1e-5
        np.testing.assert_array_equal(mask[clear], (probs > value)[clear])
    assert (
        "validation mIoU of run test"
        in json.loads((tmp_path / "calibrated" / "summary.json").read_text())["threshold"]["note"]
    )


def test_cli_coco_rle_decodes_to_the_written_masks(tiny_dir, tmp_path):
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        require("pycocotools", "pip install -r requirements-dev.txt")
    folder = photo_folder(tmp_path, n=3)
    out = tmp_path / "out"
    args = ["--prompt", "sky", "--prompt", "a dog | red", "--threshold", "0.55", "--instances", "--coco", "rle"]
    assert run_cli(tiny_dir, [folder], out, *args) == 0
    coco = json.loads((out / "coco.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(coco["images"]) == 3 and {c["name"] for c in coco["categories"]} == {"sky", "a dog | red"}
    assert all("coco" not in entry for entry in summary["images"])  # kept out of summary.json
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) > 3
    for image in coco["images"]:
        entry = next(e for e in summary["images"] if e["image"] == image["file_name"])
        for prompt in entry["prompts"]:
            found = [
                a
                for a in coco["annotations"]
                if a["image_id"] == image["id"] and names[a["category_id"]] == prompt["prompt"]
            ]
            assert len(found) == len(prompt["instances"])
            union = np.zeros((image["height"], image["width"]), dtype=bool)
            for annotation in found:
                rle = {
                    "size": annotation["segmentation"]["size"],
                    "counts": annotation["segmentation"]["counts"].encode(),
                }
                decoded = coco_mask.decode(rle).astype(bool)
                assert annotation["area"] == decoded.sum() and not (union & decoded).any()
                union |= decoded
            np.testing.assert_array_equal(union, read_mask(prompt["files"]["mask"]))


def test_cli_tiles_on_a_small_image_equal_the_plain_run(tiny_dir, tmp_path):
    random_image(64, 64, seed=9).save(tmp_path / "img.png")
    plain, tiled = tmp_path / "plain", tmp_path / "tiled"
    assert run_cli(tiny_dir, [tmp_path / "img.png"], plain, "--prompt", "sky | red", "--threshold", "0.5") == 0
    args = ["--prompt", "sky | red", "--threshold", "0.5", "--tile", "--tile-size", "64"]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tiled, *args) == 0
    files = sorted((plain / "img.png").iterdir())
    assert files and [p.name for p in files] == [p.name for p in sorted((tiled / "img.png").iterdir())]
    for path in files:
        assert path.read_bytes() == (tiled / "img.png" / path.name).read_bytes()
    summary = json.loads((tiled / "summary.json").read_text())
    assert summary["pipeline"]["tile"] == 64 and summary["pipeline"]["tile_overlap"] == 16


def test_cli_an_image_of_too_many_tiles_is_a_counted_skip(tiny_dir, tmp_path):
    random_image(64, 64, seed=9).save(tmp_path / "ok.png")
    Image.new("RGB", (60_000, 1), (90, 120, 200)).save(tmp_path / "strip.png")  # 5,000 windows of 16 px
    out = tmp_path / "out"
    args = ["--prompt", "sky", "--tile", "--tile-size", "16"]
    assert run_cli(tiny_dir, [tmp_path / "ok.png", tmp_path / "strip.png"], out, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == 1 and summary["skipped"] == 1
    (error,) = summary["errors"]
    assert "takes 5,000 windows (at most 4,096): use larger tiles, or crop or resize the image" in error["error"]


def test_cli_guided_refinement_runs_and_follows_the_library(tiny_dir, model, tmp_path):
    random_image(96, 64, seed=11).save(tmp_path / "img.png")
    out = tmp_path / "out"
    args = ["--prompt", "sky", "--threshold", "0.5", "--refine", "guided", "--prob-bits", "16"]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *args) == 0
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(tmp_path / "img.png")
    found = predictor.predict_masks(["sky"], 0.5, refine="guided")
    prompt = json.loads((out / "summary.json").read_text())["images"][0]["prompts"][0]
    written = np.asarray(Image.open(prompt["files"]["probability"])) / 65535
    assert np.abs(written - found.probs[0]).max() <= 1e-4
    assert np.abs(written - predictor.predict(phrases=["sky"])[0]).max() > 1e-3  # refined, not the plain map
    np.testing.assert_array_equal(read_mask(prompt["files"]["mask"]), found.masks[0])


def test_cli_a_bad_expression_exits_2_naming_the_column(tiny_dir, tmp_path, capsys):
    random_image(32, 32).save(tmp_path / "img.png")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out", "--prompt", "sky", "--prompt", "cat | (dog")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--prompt 'cat | (dog'" in err and "column 11" in err
    assert not (tmp_path / "out").exists()


def test_cli_one_vision_pass_per_image_whatever_the_expression(tiny_dir, model, tmp_path, monkeypatch):
    import predict

    folder = photo_folder(tmp_path, n=3)
    monkeypatch.setattr(predict, "load", lambda args: model)
    args = ["--prompt", "sky | a dog & (red:1.5 - blue)", "--prompt", "green - sky"]
    with vision_tower_calls(model) as calls:
        assert run_cli(tiny_dir, [folder], tmp_path / "out", *args) == 0
    assert calls["vision"] == 3  # 3 readable images, 5 phrases


def test_cli_sam_refinement_runs_end_to_end_and_a_bad_sam_model_exits_2(tiny_dir, tiny_sam, tmp_path, capsys):
    random_image(80, 64, seed=13).save(tmp_path / "img.png")
    out, sam = tmp_path / "out", tiny_sam()
    args = ["--prompt", "sky", "--threshold", "0.5", "--instances", "--refine", "sam", "--sam-model", str(sam)]
    assert run_cli(tiny_dir, [tmp_path / "img.png"], out, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    (prompt,) = summary["images"][0]["prompts"]
    assert summary["pipeline"]["refine"] == "sam" and len(prompt["sam_scores"]) >= 1
    assert read_mask(prompt["files"]["mask"]).shape == (64, 80)
    capsys.readouterr()
    args[-1] = str(tmp_path / "no_sam")
    assert run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out2", *args) == 2
    assert "error: --sam-model: " in capsys.readouterr().err and not (tmp_path / "out2" / "img.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_dir, [tmp_path / "img.png"], tmp_path / "out3", "--prompt", "sky", "--sam-model", str(sam))
    assert exit_info.value.code == 2 and "--sam-model is the checkpoint of --refine sam" in capsys.readouterr().err


def test_a_damaged_summary_line_is_left_out_of_coco_json_with_a_note(tiny_dir, tmp_path, capsys):
    """A --coco --resume over a summary.jsonl with a line edited by hand (no size) processed every image, then
    stopped at the very end with a KeyError and no coco.json."""
    folder = photo_folder(tmp_path, n=2)
    out = tmp_path / "out"
    args = ["--prompt", "sky", "--threshold", "0.55", "--instances", "--coco", "rle"]
    assert run_cli(tiny_dir, [folder], out, *args) == 0
    with open(out / "summary.jsonl", "a") as lines:
        lines.write('{"image": "zzz.png"}\n{"image": "yyy.png", "width": 4, "height": 4, "coco": [7]}\n')
    capsys.readouterr()
    assert run_cli(tiny_dir, [folder], out, *args, "--resume") == 0
    coco = json.loads((out / "coco.json").read_text())
    names = {image["file_name"] for image in coco["images"]}
    assert len(names) == 2 and not names & {"zzz.png", "yyy.png"}
    assert "note: 2 line(s) of" in capsys.readouterr().err


def test_cli_coco_polygons_rasterise_to_the_written_masks(tiny_dir, tmp_path):
    """--coco polygons: per instance a list of [x1, y1, x2, y2, ...] outlines that pycocotools rasterises back to the
    mask (holes filled, as polygons hold none), up to pixels on its boundary."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        require("pycocotools", "pip install -r requirements-dev.txt")
    random_image(80, 64, seed=5).save(tmp_path / "img.png")
    flags = ["--threshold", "0.45", "--instances", "--fill-holes", "--coco", "polygons"]
    entry, mask = sky_run(tiny_dir, tmp_path, "out", *flags)
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert len(coco["annotations"]) == len(entry["instances"]) > 1
    drawn = np.zeros_like(mask)
    for annotation, instance in zip(coco["annotations"], entry["instances"]):
        outlines = annotation["segmentation"]
        assert isinstance(outlines, list) and all(len(xy) >= 8 and len(xy) % 2 == 0 for xy in outlines)
        assert annotation["bbox"] == instance["bbox"]
        drawn |= coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(outlines, 64, 80))).astype(bool)
    boundary = ndimage.binary_dilation(mask, EIGHT) & ~ndimage.binary_erosion(mask, EIGHT, border_value=1)
    assert (drawn & mask).sum() / (drawn | mask).sum() >= 0.9 and not ((drawn != mask) & ~boundary).any()


def test_cli_min_area_drops_the_smaller_components(tiny_dir, tmp_path):
    random_image(80, 64, seed=5).save(tmp_path / "img.png")
    _, plain = sky_run(tiny_dir, tmp_path, "plain", "--threshold", "0.5")
    _, kept = sky_run(tiny_dir, tmp_path, "kept", "--threshold", "0.5", "--min-area", "40")
    labels, _ = ndimage.label(plain, structure=EIGHT)
    areas = np.bincount(labels.ravel())
    np.testing.assert_array_equal(kept, plain & (areas >= 40)[labels])
    assert (areas[1:] < 40).any() and (areas[1:] >= 40).any()  # some components go, some stay


def test_cli_shrink_erodes_by_a_disk(tiny_dir, tmp_path):
    """--shrink 2 = binary_erosion by a disk of radius 2, the border not an edge (clipseg.postprocess's reference)."""
    random_image(80, 64, seed=5).save(tmp_path / "img.png")
    _, plain = sky_run(tiny_dir, tmp_path, "plain", "--threshold", "0.3")
    _, shrunk = sky_run(tiny_dir, tmp_path, "shrunk", "--threshold", "0.3", "--shrink", "2")
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
    np.testing.assert_array_equal(shrunk, ndimage.binary_erosion(plain, disk, border_value=1))
    assert shrunk.any() and not np.array_equal(shrunk, ndimage.binary_erosion(plain, EIGHT, border_value=1))
    assert not np.array_equal(shrunk, ndimage.binary_erosion(plain, np.ones((5, 5)), border_value=1))


def test_cli_sort_instances_orders_the_summary_by_area_or_mean_probability(tiny_dir, model, tmp_path):
    random_image(80, 64, seed=5).save(tmp_path / "img.png")
    flags = ["--threshold", "0.45", "--instances", "--sort-instances"]
    runs = {key: sky_run(tiny_dir, tmp_path, key, *flags, key) for key in ("area", "score")}
    predictor = Predictor(model, image_size=SIZE)
    predictor.set_image(tmp_path / "img.png")
    (probs,) = predictor.predict(phrases=["sky"])
    labels, count = ndimage.label(runs["area"][1], structure=EIGHT)
    parts = sorted((float((labels == k).sum()), float(probs[labels == k].mean())) for k in range(1, count + 1))
    for entry, mask in runs.values():
        np.testing.assert_array_equal(mask, runs["area"][1])  # the order changes no pixel
        np.testing.assert_allclose(sorted((i["area"], i["score"]) for i in entry["instances"]), parts, atol=1e-5)
    areas = [i["area"] for i in runs["area"][0]["instances"]]
    scores = [i["score"] for i in runs["score"][0]["instances"]]
    assert count > 2 and areas == sorted(areas, reverse=True) and scores == sorted(scores, reverse=True)
    assert areas != [i["area"] for i in runs["score"][0]["instances"]]  # the two orders differ on this image
