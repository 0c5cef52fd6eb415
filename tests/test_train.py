"""train.py's command line and what a run yields: the loop learns (also with visual prompts and several prompts per
image), the sample stream and schedules, validation and best/, DDP keeps replicas identical, loader workers exit,
fine-tuning from a checkpoint on a folder, and the failures that stop a run or are counted (NaN, fp16 overflow,
unwritable output, corrupt images, bad polygons). Resume, kills and full disks: test_train_resume.py."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY,
    VALIDATE,
    SyntheticView,
    decoder_weights,
    flags,
    losses,
    run,
    subprocess_env,
    training_state,
    validation_records,
    write_bad_polygons,
)
from PIL import Image
from torch.utils.data import Dataset

import dataset
import train
from clipseg import outputs, runs, sampling, train_args, training
from clipseg.samples import ImageInfo, Sample, Task, collate
from model import CLIPSeg, TextCache

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_loss_falls_and_run_directory_is_complete(tmp_path, synthetic_root):
    summary = run(flags(tmp_path, synthetic_root, "--name=learn", "--max-iterations=40", "--ckpt=20", "--lr=3e-3"))
    run_dir = tmp_path / "ck" / "learn"
    curve = losses(run_dir)
    assert len(curve) == 40 and summary.step == 40 and not summary.stopped_early
    assert np.mean(curve[-5:]) < 0.6 * np.mean(curve[:5])
    assert {"args.json", "config.json", "model.safetensors", "train_state.pt", "log.jsonl", "loss.png"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert Image.open(run_dir / "loss.png").format == "PNG"
    assert json.loads((run_dir / "args.json").read_text())["max_iterations"] == 40
    records = runs.read_log(run_dir / "log.jsonl")
    assert all({"step", "loss", "lr", "samples_per_s"} <= r.keys() for r in records if "loss" in r)
    train_records = [r for r in records if "loss" in r]
    for previous, record in zip(train_records, train_records[1:]):  # one iteration of 4 samples per line
        # each line's rate is over its own iteration: at least 4 samples / the time between the lines (pauses for
        # checkpoints are left out of the rate, never added), and not absurdly far from the run's overall rate
        assert record["samples_per_s"] >= 4 / (record["time"] - previous["time"] + 0.001)  # times: 3 decimals
    logged_rate = np.median([r["samples_per_s"] for r in train_records[1:]])  # the first includes start-up
    assert summary.samples_per_second / 20 < logged_rate < 20 * summary.samples_per_second
    assert [r["lr"] for r in records if "loss" in r][-1] == pytest.approx(3e-4)  # cosine down to lr / 10
    model = CLIPSeg.from_pretrained(run_dir)
    assert model.config.image_size == 64
    state = training_state(run_dir)
    assert state["step"] == 40
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, state["decoder"][key])


@pytest.mark.slow
def test_overfits_one_batch(tmp_path, synthetic_root):
    import dataset

    fixed = dataset.build_dataset("synthetic", synthetic_root, "train", train=False, image_size=64)
    batch = [fixed[i] for i in range(4)]
    for position, sample in enumerate(batch):  # as training samples: no test-mode ground truth, nothing skipped
        batch[position] = replace(
            sample,
            tasks=[Task(task_id=t.task_id, phrase=t.phrase) for t in sample.tasks],
            image=ImageInfo(),
            skipped=[],
        )

    class OneBatch(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return batch[index]

    argv = flags(tmp_path, synthetic_root, "--name=overfit", "--max-iterations=150", "--ckpt=150", "--lr=1e-2")
    run([*argv, "--lrs=none", "--no-amp", "--refined"], dataset=OneBatch())
    curve = losses(tmp_path / "ck" / "overfit")
    assert curve[-1] < 0.25 * curve[0]
    assert curve[-1] < 0.1


@pytest.mark.slow
def test_weight_decay_is_applied(tmp_path, synthetic_root):
    norms = {}
    for wd in ("0", "30"):
        argv = flags(tmp_path, synthetic_root, f"--name=wd{wd}", "--max-iterations=3", f"--wd={wd}", "--lr=1e-2")
        run(argv)
        norms[wd] = sum(v.norm() ** 2 for v in decoder_weights(tmp_path / "ck" / f"wd{wd}").values())
    # AdamW decoupled decay: each step multiplies the weights by (1 - lr * wd) = 0.7 on top of the Adam update.
    assert norms["30"] < 0.6 * norms["0"]


def test_mixed_text_and_visual_conditionals():
    model = CLIPSeg.from_backbone("tiny")
    model.text_cache = TextCache(100)
    phrases = ["a photo of a red circle.", "blue square."]
    sample = Sample(
        pixel_values=torch.zeros(3, 64, 64),
        tasks=[Task(phrase=phrases[0]), Task(phrase=phrases[1], has_prompt_image=True)],
        masks=torch.zeros(2, 1, 64, 64),
        prompt_images=torch.randn(2, 3, 64, 64),
    )
    batch = collate([sample])
    torch.manual_seed(0)
    mixed = training.conditionals(model, batch, (0.0, 0.5), device=torch.device("cpu"))
    text = model.embed_text(phrases)
    visual = model.embed_images(batch.prompt_images[1:])[0]
    assert mixed.shape == (2, 64)
    assert torch.allclose(mixed[0], text[0])  # no support image: w = 1
    # The second is w * text + (1 - w) * visual with w in [0, 0.5]: solve for w along one coordinate.
    w = (mixed[1] - visual) / (text[1] - visual)
    assert 0 <= w[0] <= 0.5 and torch.allclose(w, w[0].expand_as(w), atol=1e-4)
    assert set(model.text_cache) == set(phrases)  # each phrase, template included, is encoded once


def test_mix_run_trains_with_visual_prompts(tmp_path, synthetic_root):
    summary = run(flags(tmp_path, synthetic_root, "--name=mix", "--max-iterations=3", "--mix"))
    assert summary.step == 3 and np.isfinite(summary.final_loss)


def test_text_cache_is_bounded_and_keeps_the_batch():
    cache = TextCache(4)
    for phrase in "abcd":
        cache[phrase] = torch.zeros(1)
    cache.touch(["a", "b"])
    cache["e"], cache["f"] = torch.zeros(1), torch.zeros(1)
    assert list(cache) == ["a", "b", "e", "f"]


# ------------------------------------------------------------------------------------------ sample stream


def test_sampler_epochs_ranks_and_resume():
    single = iter(sampling.InfiniteBatchSampler(10, 4, seed=3, start_step=0, world=sampling.Distributed()))
    batches = [next(single) for _ in range(5)]
    indices = [i for b in batches for i, _ in b]
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a new permutation per epoch
    ranks = [iter(sampling.InfiniteBatchSampler(10, 4, 3, 0, sampling.Distributed(r, 2, r))) for r in range(2)]
    for batch in batches:
        assert next(ranks[0]) + next(ranks[1]) == batch  # the global batch does not depend on the world size
    resumed = iter(sampling.InfiniteBatchSampler(10, 4, seed=3, start_step=3, world=sampling.Distributed()))
    assert [next(resumed) for _ in range(2)] == batches[3:]


def test_dropout_flag_reaches_every_decoder_dropout(tmp_path, synthetic_root):
    for rate in (0.0, 0.3):
        model = train_args.build_model(train.parse_args(flags(tmp_path, synthetic_root, f"--dropout={rate}")))
        assert model.config.dropout == rate
        assert {(layer.dropout, layer.self_attn.dropout, layer.mlp.dropout) for layer in model.decoder.layers} == {
            (rate, rate, rate)
        }


def test_whole_image_prob_reaches_the_training_set(tmp_path, synthetic_root):
    for share in (0.0, 0.4):
        data = train_args.build_training_set(
            train.parse_args(flags(tmp_path, synthetic_root, f"--whole-image-prob={share}"))
        )
        assert data.train and data.whole_image_prob == share


def test_precision_description_names_why_mixed_precision_is_off():
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert train.precision_description("bf16", torch.bfloat16, cpu) == "bf16 (mixed, bfloat16)"
    assert train.precision_description("bf16", torch.float16, torch.device("cuda")) == "bf16 (mixed, float16)"
    assert train.precision_description("fp32", None, cpu) == "fp32"
    assert "no native bf16 on this CPU" in train.precision_description("bf16", None, cpu)
    assert train.precision_description("bf16", None, mps) == "fp32 (no mixed precision on mps)"


def test_learning_rate_schedule():
    assert training.learning_rate_factor(0, 100, "cosine") == 1.0
    assert training.learning_rate_factor(50, 100, "cosine") == pytest.approx(0.55)
    assert training.learning_rate_factor(100, 100, "cosine") == pytest.approx(0.1)
    assert training.learning_rate_factor(70, 100, "none") == 1.0


# ------------------------------------------------------------------------------------------ multi-process


@pytest.mark.slow
def test_run_with_loader_workers_exits_when_done(tmp_path, synthetic_root):
    argv = [*flags(tmp_path, synthetic_root, "--name=workers", "--max-iterations=3"), "--num-workers=2"]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,  # workers left running used to block the interpreter's exit forever
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished at iteration 3/3" in result.stdout


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_replicas(tmp_path, synthetic_root):
    argv = flags(tmp_path, synthetic_root, "--name=ddp", "--max-iterations=3", "--ckpt=2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(REPO / "train.py"), *argv],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ck" / "ddp"
    saved = [r for r in runs.read_log(run_dir / "log.jsonl") if r.get("checkpoint")]
    assert [r["step"] for r in saved] == [2, 3]
    for record in saved:
        first, second = record["replica_checksums"]
        assert first == second  # gradients were averaged: both ranks took the same steps
    assert json.loads((run_dir / "args.json").read_text())["world_size"] == 2
    assert result.stdout.count("finished at iteration 3/3") == 1  # only rank 0 reports (and writes)


# ---------------------------------------------------------------------------------------------- fine-tune


def write_user_folder(directory: Path, n: int = 6) -> Path:
    """n 80x80 images with one coloured square each, and a JSONL index with polygon masks."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 60, size=(80, 80, 3), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(5, 40, size=2))
        colour, phrase = [((220, 30, 30), "red square"), ((30, 30, 220), "blue square")][i % 2]
        pixels[y : y + 30, x : x + 30] = colour
        Image.fromarray(pixels).save(directory / f"img{i}.png")
        square = [[x, y], [x + 30, y], [x + 30, y + 30], [x, y + 30]]
        lines.append(json.dumps({"image": f"img{i}.png", "phrase": phrase, "mask": [square]}))
    index = directory / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return index


def test_finetune_from_saved_checkpoint_on_user_folder(tmp_path):
    torch.manual_seed(0)
    start = CLIPSeg.from_backbone("tiny", image_size=64).save_pretrained(tmp_path / "start")
    index = write_user_folder(tmp_path / "mine")
    argv = [*TINY, f"--checkpoints-dir={tmp_path / 'ck'}", "--name=ft", "--data=folder", f"--data-root={index}"]
    argv = [a for a in argv if a != "--backbone=tiny"] + [f"--init={start}", "--max-iterations=4"]
    assert train.main(argv) == 0
    tuned, initial = CLIPSeg.from_pretrained(tmp_path / "ck" / "ft"), CLIPSeg.from_pretrained(start)
    for (name, after), before in zip(tuned.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(after, before) == (not name.startswith("decoder.")), name  # only the decoder trained


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "a.jpg", "phrase": "x"\n', "train.jsonl"),  # cut short: not JSON
        (b"\xff\xfe not text".decode("latin-1"), "train.jsonl"),
    ],
)
def test_an_index_that_cannot_be_read_stops_with_a_message(tmp_path, capsys, content, message):
    index = tmp_path / "train.jsonl"
    index.write_bytes(content.encode("latin-1"))
    argv = [*TINY, f"--checkpoints-dir={tmp_path / 'ck'}", "--name=bad", "--data=folder", f"--data-root={index}"]
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert f"train.py: error: cannot read the folder data at {index}: " in error and message in error
    assert "Traceback" not in error


# ----------------------------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_root):
    def poison_iteration_4(reads, sample):
        if reads > 3 * 4:
            sample.pixel_values = torch.full_like(sample.pixel_values, float("nan"))
        return sample

    argv = flags(tmp_path, synthetic_root, "--name=nan", "--max-iterations=10", "--ckpt=2")
    with pytest.raises(training.NonFiniteLoss, match=r"non-finite loss at iteration 4 .*checkpoint \(iteration 2\)"):
        run(argv, dataset=SyntheticView(synthetic_root, poison_iteration_4))
    run_dir = tmp_path / "ck" / "nan"
    state = training_state(run_dir)
    assert state["step"] == 2
    for key, value in decoder_weights(run_dir).items():
        assert torch.equal(value, state["decoder"][key.removeprefix("decoder.")])
        assert torch.isfinite(value).all()


@pytest.mark.slow
def test_fp16_overflow_is_skipped_by_the_gradient_scaler(tmp_path, synthetic_root, monkeypatch):
    """GPUs without bf16 train in fp16 with a GradScaler: a step whose fp16 gradients overflow is skipped (weights
    untouched) and the scale is lowered until the steps fit. Forced on the CPU with an absurd initial scale."""
    monkeypatch.setattr(training, "amp_dtype", lambda device, amp: torch.float16 if amp else None)
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real_scaler(*a, **k, init_scale=2.0**40))
    argv = flags(tmp_path, synthetic_root, "--name=fp16", "--max-iterations=3")
    initial = train_args.build_model(train.parse_args(argv)).decoder.state_dict()
    summary = run(argv)
    run_dir = tmp_path / "ck" / "fp16"
    assert summary.step == 3 and np.isfinite(summary.final_loss)
    assert training_state(run_dir)["scaler"]["scale"] == 2.0**37  # three overflows, three halvings
    for key, value in decoder_weights(run_dir).items():
        assert torch.equal(value, initial[key.removeprefix("decoder.")]), key  # overflowed steps never applied

    argv = flags(tmp_path, synthetic_root, "--name=fp16-long", "--max-iterations=40", "--lr=3e-3")
    summary = run(argv)
    assert training_state(tmp_path / "ck" / "fp16-long")["scaler"]["scale"] <= 2.0**20  # lowered until steps fit
    trained = decoder_weights(tmp_path / "ck" / "fp16-long")
    assert all(torch.isfinite(value).all() for value in trained.values()) and np.isfinite(summary.final_loss)
    assert not torch.equal(trained["decoder.film_mul.weight"], initial["film_mul.weight"])  # later steps applied


def test_unwritable_or_full_output_fails_before_training(tmp_path, synthetic_root, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    argv = [*flags(tmp_path, synthetic_root, "--name=x"), f"--checkpoints-dir={blocker}"]
    with pytest.raises(train.TrainingError, match=f"cannot write {blocker}/x: {blocker} is a file, not a folder"):
        run(argv)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**5))
    with pytest.raises(train.TrainingError, match="not enough disk space"):
        run(flags(tmp_path, synthetic_root, "--name=full"))
    assert not (tmp_path / "ck" / "full" / "log.jsonl").exists()


@pytest.mark.slow
def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, synthetic_root, capsys):
    root = tmp_path / "damaged"
    shutil.copytree(synthetic_root, root)
    tasks = json.loads((root / "data/VGPhraseCut_v0/refer_train.json").read_text())
    image_ids = sorted({t["image_id"] for t in tasks})
    broken = set(image_ids[::10])
    for image_id in broken:
        (root / f"data/VGPhraseCut_v0/images/{image_id}.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    bad_tasks = sum(t["image_id"] in broken for t in tasks)
    assert 0.05 <= bad_tasks / len(tasks) <= 0.2
    with pytest.warns(UserWarning, match="skipped task"):
        summary = run(flags(tmp_path, root, "--name=soak", "--max-iterations=20"))
    assert summary.step == 20 and np.isfinite(summary.final_loss)
    assert summary.skipped > 0 and sum(summary.skip_reasons.values()) == summary.skipped
    assert all("cannot decode" in reason for reason in summary.skip_reasons)
    assert f"{summary.skipped} sample(s) skipped" in capsys.readouterr().out
    records = [r for r in runs.read_log(tmp_path / "ck" / "soak" / "log.jsonl") if "loss" in r]
    assert records[-1]["skipped"] == summary.skipped


# ------------------------------------------------------------------------------------------------- validation


def test_validation_equals_score_py_on_the_same_subset_and_weights(tmp_path, synthetic_root):
    from clipseg.scoring import score

    args = train.parse_args(flags(tmp_path, synthetic_root, *VALIDATE))
    validation = training.Validation.of(args)
    assert len(validation.tasks) == 7 and validation.tasks == training.Validation.of(args).tasks  # fixed, seeded
    model = train_args.build_model(args).eval()
    model.text_cache = {}
    scores = validation.run(model, "fp32")
    reference = score(model, validation.data, batch_size=validation.batch_size, tasks=validation.tasks)
    paper = reference.paper.compute()
    assert reference.n_samples == 7
    for key in ("miou", "iou_fg", "ap"):
        assert scores[f"val_{key}"] == paper[key], key
    curve = scores["val_threshold_curve"]
    assert curve["metric"] == "miou" and len(curve["thresholds"]) == 49
    np.testing.assert_allclose(curve["values"], reference.paper.curves()["miou"], atol=1e-6)
    np.testing.assert_allclose(curve["thresholds"], np.arange(1, 50) / 50)
    assert scores["val_threshold"] == paper["miou_best_threshold"]


@pytest.mark.parametrize("case", ["targets all empty", "a model that predicts nothing"])
def test_a_flat_validation_curve_calibrates_no_threshold(case, capsys):
    """Every threshold scoring the same (mIoU 0 throughout) has no argmax worth keeping: the lowest, 0.02, was
    written to config.json and made every later mask cover nearly the whole image. The config keeps no threshold
    (predictions use the paper's 0.3) and the run says why."""
    from types import SimpleNamespace

    from clipseg.config import tiny_config
    from clipseg.metrics import PaperMetrics

    generator = torch.Generator().manual_seed(0)
    random_map, random_truth = torch.rand(3, 1, 8, 8, generator=generator), torch.rand(3, 1, 8, 8, generator=generator)
    paper = PaperMetrics()
    if case == "targets all empty":
        paper.update(random_map, torch.zeros(3, 1, 8, 8))
    else:
        paper.update(torch.zeros(3, 1, 8, 8), (random_truth > 0.5).float())
    threshold, curve = training.calibration(paper, "miou")
    assert threshold is None and set(curve["values"]) == {0.0} and len(curve["thresholds"]) == 49
    config = replace(tiny_config(), threshold=0.4, threshold_origin="an earlier validation")
    loop = SimpleNamespace(
        model=SimpleNamespace(config=config), args=SimpleNamespace(name="run"), step=8, validation=None
    )
    training.TrainingLoop.calibrate(loop, {"val_threshold": threshold, "val_threshold_curve": curve})
    assert config.threshold is None and config.threshold_origin is None
    assert "run: validation at iteration 8: miou is 0 at every threshold" in capsys.readouterr().out


def test_the_calibrated_threshold_is_the_argmax_of_the_validation_curve_and_the_models_default(validated):
    from clipseg.predictor import Predictor

    run_dir, summary, _ = validated
    records = validation_records(run_dir)
    for record in records:
        curve = record["val_threshold_curve"]
        assert record["val_threshold"] == curve["thresholds"][int(np.argmax(curve["values"]))]
        assert curve["values"][curve["thresholds"].index(0.3)] == pytest.approx(record["val_miou"], abs=1e-6)
    best_record = next(r for r in records if r["step"] == summary.best.step)
    best_config = json.loads((run_dir / "best" / "config.json").read_text())
    assert best_config["clipseg_threshold"] == best_record["val_threshold"]
    assert f"validation of iteration {summary.best.step}:" in best_config["clipseg_threshold_origin"]
    run_config = json.loads((run_dir / "config.json").read_text())  # the final model, validated at iteration 12
    assert run_config["clipseg_threshold"] == records[-1]["val_threshold"]
    predictor = Predictor(CLIPSeg.from_pretrained(run_dir / "best"))
    assert predictor.default_threshold() == (best_record["val_threshold"], "calibrated")
    assert predictor.default_threshold(0.55) == (0.55, "given")


def test_best_is_the_best_validated_iteration_and_loads_in_hf(validated):
    run_dir, summary, _ = validated
    records = validation_records(run_dir)
    assert [r["step"] for r in records] == [4, 8, 12]
    best_record = max(records, key=lambda r: (r["val_miou"], -r["step"]))  # the first of equal maxima
    info = json.loads((run_dir / "best" / "best.json").read_text())
    assert info["step"] == best_record["step"] == summary.best.step and info["value"] == best_record["val_miou"]
    assert [r["best"] for r in records if r["best"]][-1] and records[records.index(best_record)]["best"]
    import transformers

    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(run_dir / "best").eval()
    ours = CLIPSeg.from_pretrained(run_dir / "best").eval()
    pixels = torch.randn(1, 3, 64, 64)
    ids, mask = ours.tokenize(["a red circle"])
    with torch.no_grad():
        expected = ours(pixels, input_ids=ids, attention_mask=mask).logits[:, 0]
        got = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-5, rtol=0)
    assert Image.open(run_dir / "loss.png").size[1] > 500  # the validation panel below the loss


def test_a_kept_iteration_loads(validated):
    run_dir, _, _ = validated
    kept = CLIPSeg.from_pretrained(run_dir / "iter_000008")
    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    final = CLIPSeg.from_pretrained(run_dir)
    assert state["step"] == 12 and not (run_dir / "iter_000004").exists()
    assert any(not torch.equal(a, b) for a, b in zip(kept.decoder.parameters(), final.decoder.parameters()))


def test_score_py_scores_the_best_checkpoint(validated, synthetic_root, capsys):
    import score

    run_dir, _, _ = validated
    results = score.main(
        ["val", "--checkpoint", "best", "--checkpoints-dir", str(run_dir.parent), "--data", "synthetic",
         "--data-root", str(synthetic_root), "--limit", "3", "--num-workers", "0"]
    )  # fmt: skip
    assert results["model"].endswith("val/best") and results["n_samples"] == 3


def test_validation_runs_in_fp32_also_when_training_in_bf16(tmp_path, synthetic_root, monkeypatch):
    """The paper's numbers are fp32: validation, which picks best/, scores as score.py does by default."""
    monkeypatch.setattr(training, "amp_dtype", lambda device, amp: torch.bfloat16 if amp else None)
    real_run, precisions = training.Validation.run, []

    def recording(self, model, precision):
        precisions.append(precision)
        return real_run(self, model, precision)

    monkeypatch.setattr(training.Validation, "run", recording)
    argv = flags(tmp_path, synthetic_root, "--name=v", "--max-iterations=2", "--val-interval=2", "--val-samples=3")
    assert run([*argv, "--precision=bf16"]).step == 2 and precisions == ["fp32"]


def test_validation_encodes_its_phrases_in_a_cache_of_its_own(tmp_path, synthetic_root):
    """Validation runs fp32 beside bf16 training steps: with one shared phrase cache an embedding depended on which
    of the two encoded it first, and a resumed run no longer repeated an uninterrupted one."""
    args = train.parse_args(flags(tmp_path, synthetic_root, "--name=c", "--val-interval=2", "--val-samples=3"))
    validation = training.Validation.of(args)
    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", image_size=64)
    phrases = {validation.data.task_info(i).phrase for i in validation.tasks}
    model.text_cache = training_cache = TextCache(100)
    stale = {phrase: torch.zeros(model.config.clip.projection_dim) for phrase in phrases}  # e.g. bf16 encodings
    training_cache.update(stale)
    first = validation.run(model, "fp32")
    assert model.text_cache is training_cache and dict(training_cache) == stale  # left as the training steps had it
    assert set(validation.text_cache) == phrases
    with torch.no_grad():
        for phrase, embedding in validation.text_cache.items():
            assert torch.equal(embedding, model.embed_token_ids(*model.tokenize([phrase]))[0])  # fp32, its own
    assert validation.run(model, "fp32") == first


# ------------------------------------------------------------------------------------ prompts per image


def test_several_prompts_per_crop_run_the_vision_tower_once_per_crop(tmp_path, synthetic_root):
    args = train.parse_args(flags(tmp_path, synthetic_root, "--prompts-per-image=4", "--batch-size=8"))
    model = train_args.build_model(args)
    crops = []
    model.clip.vision_model.pre_layrnorm.register_forward_hook(  # once per tower pass, in fp32 and in bf16
        lambda module, inputs, output: crops.append(inputs[0].shape[0])
    )
    data = train_args.build_training_set(args)
    batch = dataset.collate([data[0], data[5]])
    loop = training.TrainingLoop(
        args, model, runs.RunFiles(tmp_path / "k"), sampling.Distributed(), torch.device("cpu")
    )
    model.text_cache = TextCache(100)
    loss = loop.step_loss(batch)
    assert crops == [2] and torch.isfinite(loss)  # 2 crops for 8 prompts
    assert len(batch.phrases) == 8 and batch.masks.shape == (8, 1, 64, 64) and batch.prompts_per_image == [4, 4]


@pytest.mark.slow
def test_loss_falls_with_several_prompts_per_image(tmp_path, synthetic_root):
    argv = flags(tmp_path, synthetic_root, "--name=k4", "--max-iterations=30", "--ckpt=30", "--lr=3e-3")
    summary = run([*argv, "--prompts-per-image=4", "--batch-size=8"])
    curve = losses(tmp_path / "ck" / "k4")
    assert summary.step == 30 and np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])


# ------------------------------------------------------------------------------------------- recipe knobs


def test_warmup_cosine_is_the_original_trainers():
    factors = [training.learning_rate_factor(i, 100, "warmup_cosine", warmup=10) for i in range(101)]
    assert factors[:3] == pytest.approx([1 / 11, 2 / 11, 3 / 11]) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == 1.0 and factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0, abs=1e-12)


def test_prompt_templates_mix_range_and_colour_flags(tmp_path, synthetic_root):
    plain = train_args.build_training_set(train.parse_args(flags(tmp_path, synthetic_root)))
    assert plain.templates == ("{}",) and not plain.colour_jitter
    mixed = train.parse_args(flags(tmp_path, synthetic_root, "--mix", "--mix-range=0.2,0.3", "--aug-color"))
    data = train_args.build_training_set(mixed)
    assert len(data.templates) == 9 and data.visual_support and data.colour_jitter and mixed.mix_range == (0.2, 0.3)
    fixed = train_args.build_training_set(train.parse_args(flags(tmp_path, synthetic_root, "--prompt-templates=fixed")))
    phrase = fixed[0].tasks[0].phrase
    assert phrase.startswith("a photo of a ") and phrase.endswith(".")
    for bad in (["--mix-range=0.6,0.2"], ["--prompts-per-image=3"], ["--warmup=5"]):
        with pytest.raises(SystemExit):
            train.parse_args(flags(tmp_path, synthetic_root, *bad))


def test_bad_polygons_left_out_while_indexing_are_counted_in_the_log(damaged_root, tmp_path, capsys):
    first, second, _ = write_bad_polygons(damaged_root, "train")
    with pytest.warns(UserWarning, match="4 bad polygons left out"):
        run(flags(tmp_path, damaged_root, "--name=bad", "--max-iterations=1", "--ckpt=1", "--val-interval=0"))
    assert "while indexing: excluded 2 tasks (first: " in capsys.readouterr().out
    (record,) = [r for r in runs.read_log(tmp_path / "ck" / "bad" / "log.jsonl") if "excluded" in r]
    assert record["step"] == 0 and record["excluded"] == 2 and record["excluded_polygons"] == 4
    assert record["excluded_example"][0] == second and "no usable polygon" in record["excluded_example"][1]
    assert record["excluded_polygons_example"] == [
        first,
        1,
        "1 polygon dropped: 1 with non-finite or out-of-range coordinates",
    ]


def test_validation_outputs_that_are_not_finite_stop_with_a_message(synthetic_root, tmp_path, capsys, monkeypatch):
    from clipseg.transforms import NonFiniteOutput

    def overflowing(self, model, precision):
        raise NonFiniteOutput("the model's output holds 7 NaN or infinite values (of 64)")

    monkeypatch.setattr(training.Validation, "run", overflowing)
    argv = flags(tmp_path, synthetic_root, "--name=nan", "--max-iterations=2", "--ckpt=1", "--val-interval=1")
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "validation at iteration 1 stopped: the model's output holds 7 NaN" in err and "Traceback" not in err
