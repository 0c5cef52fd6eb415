"""score.py: numbers equal a direct recomputation (brute-force numpy), JSON/table/PNG outputs, prompt shuffling,
safe file names, model resolution and error messages. The library's own tests: tests/test_scoring.py (clipseg.scoring),
tests/test_loading.py (clipseg.loading)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import AMX_XEON, VNNI_EPYC, free_port, score_outputs, simulate_cpu, strict_json
from helpers import PAPER_THRESHOLDS, recompute, write_bad_polygons
from PIL import Image

import dataset as datasets
import score
from clipseg import cli
from clipseg.outputs import safe_name
from clipseg.scoring import ScoreRun, shuffled_phrases
from score import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 64  # the tiny CLIP takes any multiple of 16
LIMIT = 6
REPO = Path(__file__).resolve().parents[1]
SCORES = f"scores_test_first{LIMIT}.json"  # what score_args writes into its --out folder


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    """checkpoints/demo: a tiny model at SIZE px."""
    return tiny_checkpoint("demo", image_size=SIZE).parent


def score_args(checkpoints, synthetic_root, *extra):
    return [
        "demo", "--checkpoints-dir", str(checkpoints), "--data", "synthetic", "--data-root", str(synthetic_root),
        "--limit", str(LIMIT), "--batch-size", "4", "--num-workers", "0", "--precision", "fp32", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scored(checkpoints, synthetic_root, tmp_path_factory):
    """One CLI run with predictions saved; returns (results, printed table, predictions dir)."""
    predictions = tmp_path_factory.mktemp("predictions")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = main(score_args(checkpoints, synthetic_root, "--save-predictions", str(predictions)))
    return results, printed.getvalue(), predictions


def test_scores_equal_a_direct_recomputation(scored, checkpoints, synthetic_root):
    results, _, _ = scored
    paper, ious, cum_iou, _, samples = recompute(checkpoints, synthetic_root)
    at_03 = int(np.argmin(np.abs(PAPER_THRESHOLDS - 0.3)))
    assert results["n_samples"] == len(samples) == LIMIT
    assert results["paper"]["miou"] == pytest.approx(paper["miou"][at_03], abs=1e-9)
    assert results["paper"]["iou_fg"] == pytest.approx(paper["iou_fg"][at_03], abs=1e-9)
    assert results["paper"]["iou_bin"] == pytest.approx(paper["iou_bin"][at_03], abs=1e-9)
    assert results["paper"]["ap"] == pytest.approx(paper["ap"], abs=1e-9)
    assert results["paper"]["miou_best"] == pytest.approx(paper["miou"].max(), abs=1e-9)
    assert results["paper"]["iou_fg_best"] == pytest.approx(paper["iou_fg"].max(), abs=1e-9)
    official = results["phrasecut"]
    assert official["n_tasks"] == LIMIT
    assert official["mean_iou"] == pytest.approx(ious.mean(), abs=1e-9)
    assert official["cum_iou"] == pytest.approx(cum_iou, abs=1e-9)
    for level in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert official[f"acc@{level}"] == pytest.approx((ious > level).mean(), abs=1e-9)


def test_json_is_written_next_to_the_run_and_matches_the_returned_results(scored, checkpoints):
    results, _, _ = scored
    written = json.loads((checkpoints / "demo" / f"scores_test_first{LIMIT}.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["skipped"] == {"count": 0, "samples": []}
    assert written["split"] == "test" and written["image_size"] == SIZE and written["interrupted"] is False


def test_table_puts_the_papers_three_columns_first_with_the_values_in_percent(scored):
    results, printed, _ = scored
    header = next(line for line in printed.splitlines() if "mIoU" in line)
    assert header.split("|")[2:5] == [" mIoU ", " IoU_FG ", " AP "]
    row = next(line for line in printed.splitlines() if line.startswith("| t = 0.30"))
    cells = [cell.strip() for cell in row.split("|")[2:5]]
    assert cells == [f"{100 * results['paper'][k]:.1f}" for k in ("miou", "iou_fg", "ap")]
    assert f"| all | {LIMIT} | {100 * results['phrasecut']['mean_iou']:.1f} |" in printed
    assert "0 skipped" in printed


def test_saved_predictions_are_single_channel_binary_pngs_at_the_original_size(scored, checkpoints, synthetic_root):
    _, _, predictions = scored
    _, _, _, masks, samples = recompute(checkpoints, synthetic_root)
    assert sorted(p.name for p in predictions.iterdir()) == sorted(f"{safe_name(t)}.png" for t in masks)
    for sample in samples:
        task_id = sample.tasks[0].task_id
        with Image.open(predictions / f"{safe_name(task_id)}.png") as png:
            assert png.mode == "L"
            assert png.size == sample.image.original_size[::-1]
            pixels = np.asarray(png)
        assert set(np.unique(pixels)) <= {0, 255}
        np.testing.assert_array_equal(pixels > 0, masks[task_id])


def test_shuffled_prompts_use_another_samples_phrase_and_write_their_own_file(checkpoints, synthetic_root, scored):
    results = main(score_args(checkpoints, synthetic_root, "--shuffle-prompts"))
    data = datasets.build_dataset("synthetic", synthetic_root, "test", train=False, image_size=SIZE, limit=LIMIT)
    mapping = shuffled_phrases([(t["task_id"], t["phrase"]) for t in data.tasks])
    paper, ious, _, _, _ = recompute(checkpoints, synthetic_root, phrases_for=mapping)
    assert results["shuffle_prompts"] is True
    assert results["paper"]["ap"] == pytest.approx(paper["ap"], abs=1e-9)
    assert results["phrasecut"]["mean_iou"] == pytest.approx(ious.mean(), abs=1e-9)
    assert (checkpoints / "demo" / f"scores_test_first{LIMIT}_shuffled.json").is_file()
    assert json.loads((checkpoints / "demo" / f"scores_test_first{LIMIT}.json").read_text())["shuffle_prompts"] is False


def test_threshold_flag_moves_the_papers_reporting_threshold(checkpoints, synthetic_root, tmp_path, capsys):
    results = main(score_args(checkpoints, synthetic_root, "--threshold", "0.4", "--out", str(tmp_path)))
    paper, _, _, _, _ = recompute(checkpoints, synthetic_root)
    at_04 = int(np.argmin(np.abs(PAPER_THRESHOLDS - 0.4)))
    assert results["paper"]["threshold"] == pytest.approx(0.4)
    assert results["paper"]["miou"] == pytest.approx(paper["miou"][at_04], abs=1e-9)
    assert "| t = 0.40 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(score_args(checkpoints, synthetic_root, "--threshold", "0.33"))
    assert "0.02, 0.04, ..., 0.98" in capsys.readouterr().err


def test_interrupt_keeps_the_partial_scores_in_their_own_file(checkpoints, synthetic_root, tmp_path, monkeypatch):
    real_update, calls = ScoreRun.update, []

    def update_then_interrupt(self, predictions, save_dir=None):
        real_update(self, predictions, save_dir)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ScoreRun, "update", update_then_interrupt)
    out = tmp_path / SCORES
    out.write_text('{"earlier": true}')
    with pytest.raises(KeyboardInterrupt):
        main(score_args(checkpoints, synthetic_root, "--out", str(tmp_path)))
    partial = json.loads((tmp_path / f"scores_test_first{LIMIT}.interrupted.json").read_text())
    assert partial["interrupted"] is True and partial["n_samples"] == 4
    assert partial["paper"]["n_samples"] == 4
    assert json.loads(out.read_text()) == {"earlier": True}


def test_scores_a_users_folder_and_writes_next_to_a_model_directory(checkpoints, tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i, (width, height) in enumerate([(80, 60), (50, 90), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[10:40, 5:30] = 255
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "phrase": f"thing {i}", "mask": f"m{i}.png"}))
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoints / "demo", model_dir, ignore=shutil.ignore_patterns("scores_*"))
    results = main(
        ["--model", str(model_dir), "--data", "folder", "--data-root", str(index), "--num-workers", "0"]
        + ["--precision", "fp32"]
    )
    assert results["n_samples"] == 3 and results["phrasecut"]["n_tasks"] == 3
    assert json.loads((model_dir / "scores_test.json").read_text())["n_samples"] == 3


def test_unreadable_images_are_counted_and_listed_not_silently_dropped(checkpoints, synthetic_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    data = datasets.build_dataset("synthetic", root, "test", train=False, image_size=SIZE, limit=LIMIT)
    bad_path = Path(data[1].image.path)
    bad_tasks = [t["task_id"] for t in data.tasks if t["image_id"] == data.tasks[1]["image_id"]]
    bad_path.write_bytes(b"not an image")
    out = tmp_path / "scores"
    with pytest.warns(UserWarning, match="skipped task"):
        results = main(score_args(checkpoints, root, "--out", str(out)))
    reported = {entry["task_id"] for entry in results["skipped"]["samples"]}
    assert reported == set(bad_tasks)
    assert results["skipped"]["count"] == len(bad_tasks)
    assert results["n_samples"] + len(bad_tasks) == LIMIT
    assert json.loads((out / SCORES).read_text())["skipped"]["count"] == len(bad_tasks)
    assert f"{len(bad_tasks)} skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_a_tenth_of_the_images_corrupt_scores_the_same_as_the_clean_rest(checkpoints, synthetic_root, tmp_path):
    """Soak: skipped samples are reported and leave the scores of the others exactly as without them."""
    damaged, clean = tmp_path / "damaged", tmp_path / "clean"
    for root in (damaged, clean):
        shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".clipseg_index"))
    refer = "data/VGPhraseCut_v0/refer_train.json"
    tasks = json.loads((damaged / refer).read_text())
    broken = sorted({t["image_id"] for t in tasks})[::10]
    for image_id in broken:
        (damaged / f"data/VGPhraseCut_v0/images/{image_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    survivors = [t for t in tasks if t["image_id"] not in broken]
    (clean / refer).write_text(json.dumps(survivors))
    assert 0.05 <= 1 - len(survivors) / len(tasks) <= 0.2

    def scores(root: Path) -> dict:
        args = ["demo", "--checkpoints-dir", str(checkpoints), "--data", "synthetic", "--data-root", str(root)]
        return main([*args, "--split", "train", "--batch-size", "1", "--num-workers", "0", "--out", str(root / "s")])

    with pytest.warns(UserWarning, match="skipped task"):
        with_broken = scores(damaged)
    without = scores(clean)
    assert with_broken["skipped"]["count"] == len(tasks) - len(survivors) and without["skipped"]["count"] == 0
    assert with_broken["n_samples"] == without["n_samples"] == len(survivors)
    assert with_broken["paper"] == without["paper"]
    assert with_broken["phrasecut"] == without["phrasecut"]


def exits_with(code: int, capsys, pattern: str, argv: list[str]) -> None:
    """main(argv) stops with exit status `code` and a stderr message matching `pattern`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    assert re.search(pattern, capsys.readouterr().err)


def test_missing_run_lists_the_available_runs(checkpoints, capsys):
    pattern = "error: nope is neither a run in .* nor a directory. Runs in .*: demo"
    exits_with(2, capsys, pattern, ["nope", "--checkpoints-dir", str(checkpoints)])


def test_missing_phrasecut_data_names_the_folder(checkpoints, tmp_path, capsys):
    argv = ["demo", "--checkpoints-dir", str(checkpoints), "--data-root", str(tmp_path / "nowhere")]
    exits_with(2, capsys, re.escape(str(tmp_path / "nowhere")), argv)


def test_missing_data_names_the_data_the_run_was_trained_on(tiny_checkpoint, tmp_path, capsys):
    """`python score.py demo` on the demo run (trained on synthetic data) looked for PhraseCut and said only that."""
    run = tiny_checkpoint("demo", image_size=SIZE)
    (run / "args.json").write_text(json.dumps({"data": "synthetic", "data_root": "synthetic_phrasecut"}))
    argv = ["demo", "--checkpoints-dir", str(run.parent), "--data-root", str(tmp_path / "nowhere")]
    exits_with(2, capsys, "--data synthetic --data-root synthetic_phrasecut: give those flags to score it", argv)


def test_image_size_is_checked_against_the_models_patch(checkpoints, synthetic_root, capsys):
    flags = ["--checkpoints-dir", str(checkpoints), "--data", "synthetic", "--data-root", str(synthetic_root)]
    pattern = r"image size 100 is not a multiple of the patch size 16 .*use 96 or 112"
    exits_with(2, capsys, pattern, ["demo", *flags, "--image-size", "100"])


def test_bad_options_are_rejected_with_a_message(capsys):
    for flags, message in [
        (["demo", "--threshold", "1.5"], "--threshold"),
        (["demo", "--image-size", "0"], "--image-size"),
        (["demo", "--limit", "0"], "--limit"),
        (["demo", "--model", "other"], "give the model once: MODEL (demo) or --model (other)"),
    ]:
        with pytest.raises(SystemExit):
            main(flags)
        assert message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--model", "--backbone", "--data", "--data-root", "--split", "--limit", "--batch-size",
                 "--num-workers", "--threshold", "--out", "--save-predictions", "--shuffle-prompts", "--amp",
                 "--device", "--image-size"]:  # fmt: skip
        assert flag in text


@pytest.mark.parametrize("capabilities", [AMX_XEON, VNNI_EPYC], ids=["amx", "vnni"])
def test_scores_in_fp32_unless_asked_on_every_cpu(checkpoints, synthetic_root, tmp_path, monkeypatch, capabilities):
    """The paper's numbers are fp32: also where predict.py defaults to bf16 (AMX) or int8 (VNNI)."""
    simulate_cpu(monkeypatch, capabilities)
    args = score_args(checkpoints, synthetic_root, "--out", str(tmp_path))
    args.remove("--precision")
    args.remove("fp32")
    results = main(args)
    assert results["precision"] == "fp32"
    assert json.loads((tmp_path / SCORES).read_text())["precision"] == "fp32"


def test_an_unwritable_out_stops_before_the_model_is_loaded(checkpoints, synthetic_root, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the results could not be written")

    monkeypatch.setattr(score, "load_model", no_loading)  # the benchmarks' loading
    monkeypatch.setattr(cli, "load_command_model", no_loading)  # PhraseCut-format data's
    (tmp_path / "a_file").write_text("in the way")
    for flags in (
        ["--out", str(tmp_path / "a_file" / "scores")],
        ["--out", str(tmp_path / "a_file")],
        ["--save-predictions", str(tmp_path / "a_file")],
    ):
        exits_with(
            2,
            capsys,
            r"error: cannot write .*a_file.* is a file, not a folder",
            score_args(checkpoints, synthetic_root, *flags),
        )


def test_a_failed_write_after_scoring_keeps_the_printed_table_and_exits_1(
    checkpoints, synthetic_root, tmp_path, capsys, monkeypatch
):
    def disk_full(path, value, indent=2):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(score, "write_json", disk_full)
    exits_with(
        1,
        capsys,
        r"scores printed above were NOT saved: .*No space left",
        score_args(checkpoints, synthetic_root, "--out", str(tmp_path)),
    )
    monkeypatch.undo()
    capsys.readouterr()
    results = main(score_args(checkpoints, synthetic_root, "--out", str(tmp_path)))
    printed = capsys.readouterr().out
    assert f"| t = 0.30 | {results['paper']['miou'] * 100:.1f} |" in printed
    assert strict_json((tmp_path / SCORES).read_text())["paper"] == results["paper"]


def test_a_model_whose_output_overflows_stops_with_a_message_and_no_scores(
    overflowing_checkpoint, synthetic_root, tmp_path, capsys
):
    out = tmp_path / "scores"
    argv = ["--model", str(overflowing_checkpoint), "--data", "synthetic", "--data-root", str(synthetic_root),
            "--limit", "4", "--num-workers", "0", "--precision", "fp32", "--out", str(out)]  # fmt: skip
    exits_with(2, capsys, r"scoring stopped after 0 samples: the model's output holds \d+ NaN or infinite values", argv)
    assert not out.exists()


def test_bad_polygons_are_reported_with_the_excluded_tasks(checkpoints, damaged_root, tmp_path, capsys):
    first, second, third = write_bad_polygons(damaged_root, "test")
    with pytest.warns(UserWarning, match="4 bad polygons left out"):
        results = main(score_args(checkpoints, damaged_root, "--out", str(tmp_path)))
    assert "2 excluded (4 bad polygons left out)" in capsys.readouterr().out
    saved = strict_json((tmp_path / SCORES).read_text())
    assert saved["excluded"] == results["excluded"] and [t[0] for t in saved["excluded"]["tasks"]] == [second, third]
    assert saved["excluded_polygons"]["count"] == 4
    assert [t[:2] for t in saved["excluded_polygons"]["tasks"]] == [[first, 1], [second, 2], [third, 1]]


# ------------------------------------------------------------------------------------------------- torchrun


def scored_by(nproc, checkpoints, synthetic_root, out: Path, *extra) -> tuple[dict, dict[str, bytes], str]:
    """score.py as one process or `nproc` under torchrun: (results without the time taken, PNGs, stdout)."""
    argv = ["demo", "--checkpoints-dir", checkpoints, "--data", "synthetic", "--data-root", synthetic_root, *extra]
    argv += ["--batch-size", "4", "--num-workers", "0", "--precision", "fp32", "--device", "cpu"]
    return score_outputs(argv, out, nproc)


@pytest.mark.slow
def test_torchrun_scores_and_pngs_equal_one_processs(checkpoints, synthetic_root, tmp_path):
    one, one_pngs, _ = scored_by(None, checkpoints, synthetic_root, tmp_path / "one")
    two, two_pngs, printed = scored_by(2, checkpoints, synthetic_root, tmp_path / "two")
    assert one["n_samples"] == 10 and len(one_pngs) == 10  # every test task of the synthetic split
    assert two == one  # bit for bit: the same per-block sums added in the same order
    assert two_pngs == one_pngs
    assert printed.count("| threshold | mIoU") == 1  # the table printed once, by rank 0


def test_ranks_given_different_models_stop_with_the_fingerprint_error(
    checkpoints, tiny_checkpoint, synthetic_root, tmp_path
):
    other = tiny_checkpoint("other", seed=7, image_size=SIZE)
    port, processes = free_port(), []
    for rank, model in enumerate([checkpoints / "demo", other]):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        argv = ["--model", model, "--data", "synthetic", "--data-root", synthetic_root, "--num-workers", "0"]
        argv += ["--device", "cpu", "--out", tmp_path / f"rank{rank}"]
        command = [sys.executable, str(REPO / "score.py"), *map(str, argv)]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr[-3000:]
        assert "error: the ranks were not started alike: they differ in model (rank 0 " in stderr
        assert "Start every rank with the same model, flags and data" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.glob("rank*/*.json"))  # nothing scored, nothing written
