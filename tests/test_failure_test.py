"""failure_test.py: the saved cases are exactly the samples with IoU < 0.5 at all five thresholds; panels,
index.html (parsed) and failures.csv agree; the output folder is created; a tampered failures.csv deletes nothing
outside it. Panels and the gallery of hostile phrases and task ids: tests/test_failures.py."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_CLASSES, folder_files, run_command, simulate_cpu
from helpers import parse_gallery
from PIL import Image

import dataset as datasets
import failure_test
from clipseg import cli, failures
from clipseg.cli import model_source
from clipseg.failures import THRESHOLDS
from clipseg.outputs import safe_name
from failure_test import main
from model import CLIPSeg

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 64
LIMIT = 4


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    """checkpoints/tiny: a tiny model at SIZE px."""
    return tiny_checkpoint("tiny", seed=1, image_size=SIZE).parent


def run_args(checkpoints, synthetic_root, out, *extra):
    return [
        "--name", "tiny", "--checkpoints-dir", str(checkpoints), "--data", "synthetic", "--data-root",
        str(synthetic_root), "--limit", str(LIMIT), "--batch-size", "4", "--num-workers", "0", "--out", str(out),
        "--precision", "fp32", *extra,
    ]  # fmt: skip


def expected_ious(checkpoints, synthetic_root, oracle: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """IoU at each threshold, at the original resolution, per task, computed independently of failure_test.py.
    Tasks in `oracle` get a perfect prediction (their ground truth) instead of the model's."""
    model = CLIPSeg.from_pretrained(checkpoints / "tiny").eval()
    data = datasets.build_dataset("synthetic", synthetic_root, "test", train=False, image_size=SIZE, limit=LIMIT)
    out = {}
    for start in range(0, len(data), 4):
        batch = datasets.collate([data[i] for i in range(start, min(start + 4, len(data)))])
        with torch.no_grad():
            logits = model(batch.pixel_values, batch.phrases).logits
        for i, task_id in enumerate(batch.task_ids):
            height, width = batch.images[batch.image_of_task[i]].original_size
            gt = np.asarray(batch.tasks[i].full_mask, dtype=bool)
            probs = torch.sigmoid(F.interpolate(logits[i : i + 1], size=(height, width), mode="bilinear"))[0, 0]
            probs = gt.astype(np.float32) if task_id in oracle else probs.numpy()
            ious = []
            for t in THRESHOLDS:
                pred = probs > t
                union = (pred | gt).sum()
                ious.append((pred & gt).sum() / union if union else 0.0)
            out[task_id] = np.array(ious)
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_outputs(out: Path, expected: dict[str, np.ndarray]) -> list[dict]:
    """Panels, csv and index agree with each other and with the expected failures; returns the csv rows."""
    failing = {task for task, ious in expected.items() if (ious < 0.5).all()}
    panels = {f"{safe_name(task)}.png" for task in failing}
    assert {p.name for p in out.glob("*.png")} == panels
    rows = read_csv(out / "failures.csv")
    assert {row["task_id"] for row in rows} == failing
    for row in rows:
        ious = [float(row[f"iou@{t:.1f}"]) for t in THRESHOLDS]
        np.testing.assert_allclose(ious, expected[row["task_id"]], atol=1e-4)
        assert row["panel"] == f"{safe_name(row['task_id'])}.png"
    best = [float(row["best_iou"]) for row in rows]
    assert best == sorted(best)
    gallery = parse_gallery(out / "index.html")
    assert sorted(gallery.images) == sorted(panels)
    assert [row["panel"] for row in rows] == gallery.images  # same order: worst first
    for panel in panels:
        with Image.open(out / panel) as image:
            assert image.format == "PNG" and image.width > 400
    return rows


def test_saved_cases_are_exactly_the_samples_below_05_at_every_threshold(checkpoints, synthetic_root, tmp_path):
    out = tmp_path / "nested" / "failure_cases"  # created if missing, parents too
    result = main(run_args(checkpoints, synthetic_root, out))
    expected = expected_ious(checkpoints, synthetic_root)
    rows = check_outputs(out, expected)
    assert result["n_samples"] == LIMIT and result["n_failures"] == len(rows)
    phrases = {t["task_id"]: t["phrase"] for t in datasets.build_dataset(
        "synthetic", synthetic_root, "test", train=False, image_size=SIZE, limit=LIMIT).tasks}  # fmt: skip
    assert all(row["phrase"] == phrases[row["task_id"]] for row in rows)


def test_good_predictions_are_not_saved_and_stale_panels_are_removed(
    checkpoints, synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "failure_cases"
    main(run_args(checkpoints, synthetic_root, out))
    before = {p.name for p in out.glob("*.png")}
    (out / "notes.txt").write_text("mine")
    oracle = {row["task_id"] for row in read_csv(out / "failures.csv")[::2]}
    assert oracle and len(oracle) < len(before), "the random model should fail on at least two samples"

    order = iter(t["task_id"] for t in datasets.build_dataset(
        "synthetic", synthetic_root, "test", train=False, image_size=SIZE, limit=LIMIT).tasks)  # fmt: skip
    real_ious = failures.ious_at_thresholds

    def oracle_ious(probs, gt, thresholds):  # samples are scored in data set order
        return real_ious(gt.astype(np.float32) if next(order) in oracle else probs, gt, thresholds)

    monkeypatch.setattr(failures, "ious_at_thresholds", oracle_ious)
    main(run_args(checkpoints, synthetic_root, out))
    expected = expected_ious(checkpoints, synthetic_root, oracle)
    check_outputs(out, expected)
    assert not any((out / f"{safe_name(task)}.png").exists() for task in oracle)
    assert {p.name for p in out.glob("*.png")} == before - {f"{safe_name(t)}.png" for t in oracle}
    assert (out / "notes.txt").read_text() == "mine"


def test_interrupt_still_writes_the_gallery_of_the_cases_found_so_far(
    checkpoints, synthetic_root, tmp_path, monkeypatch
):
    real_render, rendered = failures.render_panel, []

    def render_then_interrupt(*args):
        real_render(*args)
        rendered.append(args[-1].name)
        if len(rendered) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(failures, "render_panel", render_then_interrupt)
    out = tmp_path / "failure_cases"
    with pytest.raises(KeyboardInterrupt):
        main(run_args(checkpoints, synthetic_root, out))
    assert sorted(row["panel"] for row in read_csv(out / "failures.csv")) == sorted(rendered[:1])
    assert "INTERRUPTED" in (out / "index.html").read_text(encoding="utf-8")


def test_a_tampered_failures_csv_cannot_make_it_delete_files_elsewhere(checkpoints, synthetic_root, tmp_path):
    out = tmp_path / "failure_cases"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (out / "failures.csv").write_text("task_id,panel\nx,../victim.png\ny,..\\victim.png\n", encoding="utf-8")
    main(run_args(checkpoints, synthetic_root, out))
    assert victim.read_bytes() == b"keep me"


def test_default_model_is_the_released_refined_weights_and_help_lists_every_flag(capsys):
    assert model_source(failure_test.parse_args([])) == ("CIDAS/clipseg-rd64-refined", None)
    assert failure_test.parse_args(["--name", "demo"]).model == failure_test.parse_args(["--model", "demo"]).model
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--name", "--model", "--data", "--data-root", "--split", "--limit", "--out", "--batch-size"]:
        assert flag in text


@pytest.mark.parametrize(("capabilities", "cpu_class", "fastest"), CPU_CLASSES)
def test_analyses_in_fp32_unless_asked_on_every_cpu(monkeypatch, capabilities, cpu_class, fastest):
    simulate_cpu(monkeypatch, capabilities)
    assert failure_test.parse_args([]).precision == "fp32"  # the paper's numbers are fp32
    assert failure_test.parse_args(["--precision", "int8"]).precision == "int8"


def test_missing_run_is_a_clear_error(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "nope", "--checkpoints-dir", str(checkpoints), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "nope is neither a run in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_benchmarks_score_py_runs_are_not_offered(capsys):
    """--data pascal5i was offered by --help, then refused with a message about --data folder."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "pascal5i"])
    assert (
        exit_info.value.code == 2 and "invalid choice: 'pascal5i' (choose from 'phrasecut'" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "pascal5i" not in capsys.readouterr().out


def test_an_unwritable_out_stops_before_the_model_is_loaded(checkpoints, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(cli, "load_command_model", no_loading)
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "tiny", "--checkpoints-dir", str(checkpoints), "--out", str(tmp_path / "a_file" / "cases")])
    assert exit_info.value.code == 2
    assert "error: --out: cannot write" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "in the way"


def test_a_model_whose_output_overflows_stops_with_a_message(overflowing_checkpoint, synthetic_root, tmp_path, capsys):
    out = tmp_path / "cases"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(overflowing_checkpoint), "--data", "synthetic", "--data-root", str(synthetic_root),
              "--limit", str(LIMIT), "--num-workers", "0", "--out", str(out), "--precision", "fp32"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "stopped after 0 samples: the model's output holds" in capsys.readouterr().err
    assert (out / "index.html").is_file() and not list(out.glob("*.png"))  # the (empty) gallery, no NaN panels


@pytest.mark.slow
def test_torchrun_writes_the_same_gallery_as_one_process(checkpoints, synthetic_root, tmp_path):
    galleries = {}
    for nproc in (None, 2):
        out = tmp_path / f"n{nproc}"
        argv = [*run_args(checkpoints, synthetic_root, out), "--limit", "10", "--device", "cpu"]
        done = run_command("failure_test.py", argv, tmp_path, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("samples fail (IoU < 0.5") == 1  # reported by rank 0
        galleries[nproc] = folder_files(out)
    assert galleries[2] == galleries[None]  # the panels, failures.csv and index.html
    assert len(galleries[2]) > 2
