"""train.py's checkpoints and their continuation: --resume after Ctrl-C, SIGKILL (also mid-write) or a full disk
ends bit for bit as an uninterrupted run (also in bf16, also keeping best/), lean checkpoints hold the decoder until
the end, and a resume that cannot continue (a damaged model, conflicting flags) is refused while older runs resume
with their choices."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import (
    SyntheticView,
    decoder_weights,
    flags,
    losses,
    run,
    subprocess_env,
    training_state,
    validation_records,
)
from safetensors import SafetensorError

import model as model_module
import train
from clipseg import runs, training
from clipseg.frozen_clip import run_frozen_block
from model import CLIPSeg

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- exact continuation


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_root):
    """An uninterrupted 12-iteration run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    run(flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=12", "--ckpt=4"))
    return tmp_path / "ck" / "ref"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = decoder_weights(run_dir), decoder_weights(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ours, theirs = training_state(run_dir), training_state(reference)
    assert ours["step"] == theirs["step"]
    for key, value in ours["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], theirs["optimizer"]["state"][key]["exp_avg_sq"])
    assert [r["step"] for r in runs.read_log(run_dir / "log.jsonl") if "loss" in r] == list(range(1, 13))


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_is_bitwise_exact(tmp_path, synthetic_root, reference):
    def interrupt_in_iteration_7(reads, sample):
        if reads == 6 * 4 + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return sample

    argv = flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=12", "--ckpt=4")
    summary = run(argv, dataset=SyntheticView(synthetic_root, interrupt_in_iteration_7))
    run_dir = tmp_path / "ck" / "ref"
    assert summary.stopped_early and summary.step == 7
    assert training_state(run_dir)["step"] == 7
    assert train.main([*argv, "--resume"]) == 0
    assert_same_run(run_dir, reference)


def test_a_resume_given_a_longer_run_trains_on_and_records_the_new_plan(tmp_path, synthetic_root, reference):
    """A finished run resumed with --max-iterations=14 trains 2 more iterations, and args.json records 14, so that
    a later plain --resume keeps it."""
    shutil.copytree(reference, tmp_path / "ck" / "ref")
    assert train.main([*flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=14"), "--resume"]) == 0
    run_dir = tmp_path / "ck" / "ref"
    assert training_state(run_dir)["step"] == 14
    stored = json.loads((run_dir / "args.json").read_text())
    assert (stored["max_iterations"], stored["ckpt"]) == (14, 4)


def test_bf16_resume_is_bitwise_exact(tmp_path, synthetic_root, monkeypatch):
    """--amp in bf16 (forced: emulated where the CPU has no native bf16): the frozen blocks run from bf16 copies of
    their weights, remade from the loaded checkpoint on resume, and the run still ends bit for bit as an
    uninterrupted one."""
    monkeypatch.setattr(training, "model_amp_dtype", lambda device: torch.bfloat16)
    dtypes = set()

    def recorded(layer, x, dtype, scratch):
        dtypes.add(dtype)
        return run_frozen_block(layer, x, dtype, scratch)

    monkeypatch.setattr(model_module, "run_frozen_block", recorded)

    def interrupt_in_iteration_4(reads, sample):
        if reads == 3 * 4 + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return sample

    runs_dirs = []
    for name, hook in (("whole", None), ("resumed", interrupt_in_iteration_4)):
        argv = flags(tmp_path / name, synthetic_root, "--name=amp", "--max-iterations=6", "--ckpt=2", "--amp")
        summary = run(argv, dataset=SyntheticView(synthetic_root, hook))
        if hook is not None:
            assert summary.stopped_early and summary.step == 4
            assert train.main([*argv, "--resume"]) == 0
        runs_dirs.append(tmp_path / name / "ck" / "amp")
    whole, resumed = (decoder_weights(d) for d in runs_dirs)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert losses(runs_dirs[0]) == losses(runs_dirs[1])
    assert dtypes == {torch.bfloat16}  # every training step ran the bf16 blocks


# ----------------------------------------------------------------------------------- kills and full disks


def kill_training_when(argv: list[str], cwd: Path, condition) -> None:
    """Start train.py in a subprocess and SIGKILL it as soon as `condition()` holds (it must still be running)."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        cwd=cwd,
        env=subprocess_env(threads=torch.get_num_threads()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # generous: other work may load the machine
    while time.monotonic() < deadline and process.poll() is None and not condition():
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path, synthetic_root, reference):
    argv = flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=12", "--ckpt=1")
    run_dir = tmp_path / "ck" / "ref"
    kill_training_when(argv, tmp_path, lambda: [r for r in runs.read_log(run_dir / "log.jsonl") if
                                                r.get("checkpoint") and r["step"] >= 3])  # fmt: skip
    step = training_state(run_dir)["step"]
    assert 3 <= step < 12
    CLIPSeg.from_pretrained(run_dir)  # the checkpoint on disk is complete and loadable
    assert train.main([*argv, "--resume"]) == 0
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(run_dir, reference)


KILL_AT_RENAME = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
target, kill_at = sys.argv[2], int(sys.argv[3])
import train
real_replace, renames = os.replace, []
def replace(src, dst):
    if os.path.basename(dst) == target:
        renames.append(dst)
        if len(renames) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, the rename not yet done
    return real_replace(src, dst)
os.replace = replace
sys.exit(train.main(sys.argv[4:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["model.safetensors", "train_state.pt"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, synthetic_root, reference, target):
    argv = flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=12", "--ckpt=4")
    result = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, str(REPO), target, "2", *argv],
        cwd=tmp_path,
        env=subprocess_env(threads=torch.get_num_threads()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    run_dir = tmp_path / "ck" / "ref"
    assert list(run_dir.glob(f".{target}.*.tmp"))  # killed mid-write: the new file never replaced the old one
    assert training_state(run_dir)["step"] == 4  # the checkpoint before the interrupted one
    CLIPSeg.from_pretrained(run_dir)
    assert train.main([*argv, "--resume"]) == 0
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_full_disk_during_a_safetensors_write_keeps_the_previous_checkpoint_and_resumes(
    tmp_path, synthetic_root, reference, monkeypatch, capsys
):
    """safetensors reports a failed write (a full disk) with its own SafetensorError, not OSError: the run stops with
    a message, exit 1 and no traceback, the checkpoint of iteration 4 stays, and --resume continues from it."""
    real_serialize, writes = safetensors.torch.serialize_file, []

    def disk_full_at_the_second_write(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_serialize(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", disk_full_at_the_second_write)
    argv = flags(tmp_path, synthetic_root, "--name=ref", "--max-iterations=12", "--ckpt=4")
    assert train.main(argv) == 1
    error = capsys.readouterr().err
    assert "could not write the checkpoint of iteration 8" in error and "No space left on device" in error
    assert "the last checkpoint written (iteration 4) is intact; free space and continue with --resume" in error
    run_dir = tmp_path / "ck" / "ref"
    assert training_state(run_dir)["step"] == 4 and not list(run_dir.glob(".*.tmp"))
    CLIPSeg.from_pretrained(run_dir)
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    assert_same_run(run_dir, reference)


def test_a_full_disk_while_logging_stops_with_a_message_and_resumes(tmp_path, synthetic_root, monkeypatch, capsys):
    """log.jsonl cannot take another line (a full disk) at iteration 6: exit 1 with the message, no traceback, the
    checkpoint of iteration 4 intact; --resume continues to the end."""
    real_open = open

    def open_full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if not str(path).endswith("log.jsonl") or "a" not in mode:
            return handle
        write = handle.write

        def full_at_iteration_6(data):
            if b'"step": 6,' in data or b'"step":6,' in data:
                raise OSError(28, "No space left on device")
            return write(data)

        handle.write = full_at_iteration_6  # an unbuffered FileIO takes attributes
        return handle

    monkeypatch.setattr(training, "open", open_full_disk, raising=False)
    argv = flags(tmp_path, synthetic_root, "--name=full", "--max-iterations=8", "--ckpt=4")
    assert train.main(argv) == 1
    error = capsys.readouterr().err
    assert "could not write a line of log.jsonl" in error and "No space left on device" in error
    assert "the last checkpoint written (iteration 4) is intact; free space and continue with --resume" in error
    assert "Traceback" not in error
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    steps = [record["step"] for record in runs.read_log(tmp_path / "ck" / "full" / "log.jsonl") if "loss" in record]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_resume_after_sigkill_keeps_the_best(tmp_path, synthetic_root, validated):
    reference_dir, _, argv = validated
    argv = [a.replace(str(reference_dir.parent.parent), str(tmp_path)) for a in argv]
    run_dir = tmp_path / "ck" / "val"
    kill_training_when([*argv, "--keep-checkpoints=8"], tmp_path, lambda: [r for r in validation_records(run_dir)
                                                                        if r["step"] >= 8])  # fmt: skip
    assert 4 <= training_state(run_dir)["step"] < 12  # killed after the validation of iteration 8
    assert train.main([*argv, "--resume"]) == 0
    assert_same_weights(run_dir / "best", reference_dir / "best")
    assert json.loads((run_dir / "best" / "best.json").read_text()) == json.loads(
        (reference_dir / "best" / "best.json").read_text()
    )
    assert_same_weights(run_dir, reference_dir)
    config, reference = (json.loads((d / "config.json").read_text()) for d in (run_dir, reference_dir))
    assert config["clipseg_threshold"] == reference["clipseg_threshold"] is not None


def assert_same_weights(first: Path, second: Path) -> None:
    ours, theirs = CLIPSeg.from_pretrained(first).decoder.state_dict(), CLIPSeg.from_pretrained(second).decoder
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours[key], value), key


# --------------------------------------------------------------------------------------- lean checkpoints


@pytest.mark.slow
def test_checkpoints_hold_the_decoder_while_training_and_the_whole_model_at_the_end(tmp_path, synthetic_root):
    torch.manual_seed(0)
    init = CLIPSeg.from_backbone("tiny").save_pretrained(tmp_path / "init")

    def interrupt_in_iteration_3(reads, sample):
        if reads == 2 * 4 + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return sample

    argv = flags(tmp_path, synthetic_root, "--name=lean", "--max-iterations=5", "--ckpt=2", f"--init={init}")
    argv.remove("--backbone=tiny")
    run(argv, dataset=SyntheticView(synthetic_root, interrupt_in_iteration_3))
    run_dir = tmp_path / "ck" / "lean"
    names = {p.name for p in run_dir.iterdir()}
    assert "decoder.safetensors" in names and "model.safetensors" not in names
    assert (run_dir / "decoder.safetensors").stat().st_size < (init / "model.safetensors").stat().st_size / 5
    assert json.loads((run_dir / "config.json").read_text())["clipseg_clip_source"] == str(init.resolve())
    midway = CLIPSeg.from_pretrained(run_dir)
    state = training_state(run_dir)
    for key, value in midway.decoder.state_dict().items():
        assert torch.equal(value, state["decoder"][key])
    for key, value in midway.clip.state_dict().items():
        assert torch.equal(value, CLIPSeg.from_pretrained(init).clip.state_dict()[key])
    assert train.main([*argv, "--resume"]) == 0
    names = {p.name for p in run_dir.iterdir()}
    assert "model.safetensors" in names and "decoder.safetensors" not in names
    import transformers

    transformers.CLIPSegForImageSegmentation.from_pretrained(run_dir)


# --------------------------------------------------------------------------------- refused and older runs


def test_resume_from_a_damaged_model_file_is_a_message(tmp_path, synthetic_root, capsys):
    argv = flags(tmp_path, synthetic_root, "--name=cut", "--max-iterations=2")
    run(argv)
    weights = tmp_path / "ck" / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    assert train.main([*argv, "--resume", "--max-iterations=4"]) == 2  # a model that cannot be loaded: bad input
    assert f"--resume: cannot load the run's model: {weights}: not a readable safetensors" in capsys.readouterr().err


def test_resume_skips_foreign_log_lines_and_says_when_the_log_cannot_be_written(
    tmp_path, synthetic_root, monkeypatch, capsys
):
    argv = flags(tmp_path, synthetic_root, "--name=log", "--max-iterations=2")
    run(argv)
    log = tmp_path / "ck" / "log" / "log.jsonl"
    log.write_text(log.read_text() + '5\n[1, 2]\n{"step": "three"}\n{"step": 9, "loss": 1.0}\n\xff\n')
    monkeypatch.setattr(runs, "write_text", lambda path, text: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert train.main([*argv, "--resume", "--max-iterations=4"]) == 2  # args.json first: the plan changes
    error = capsys.readouterr().err
    assert f"{log.parent / 'args.json'} cannot be written ([Errno 28] No space left); free space" in error
    assert "Traceback" not in error
    monkeypatch.undo()
    real_write_text = runs.write_text

    def full_for_the_log(path, text):
        if path == log:
            raise OSError(28, "No space left")
        return real_write_text(path, text)

    monkeypatch.setattr(runs, "write_text", full_for_the_log)
    assert train.main([*argv, "--resume", "--max-iterations=4"]) == 2
    error = capsys.readouterr().err
    assert f"{log} cannot be written ([Errno 28] No space left); free space" in error and "Traceback" not in error
    monkeypatch.undo()
    assert train.main([*argv, "--resume", "--max-iterations=4"]) == 0
    assert [r["step"] for r in runs.read_log(log) if "loss" in r] == [1, 2, 3, 4]  # the foreign lines dropped


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("{not json", "args.json: cannot be read"),
        ("[1, 2]", "args.json: not a JSON object"),
        ({"batch_size": "4"}, "args.json: batch_size = '4' has the wrong type"),
        ({"batch_size": 0}, "args.json: batch_size = 0 is not valid (must be a positive integer, got 0)"),
        ({"lr": "fast"}, "args.json: lr = 'fast' is not valid"),
        ({"mix_range": [0.5, 5]}, "args.json: mix_range = [0.5, 5] is not valid (must satisfy 0 <= A <= B <= 1"),
        ({"data": "nonexistent"}, "args.json: data = 'nonexistent' is not one of phrasecut"),
        ({"aug_color": "yes"}, "args.json: aug_color = 'yes' is not true or false"),
        ({"prompts_per_image": 3}, "batch_size 4 is not a multiple of prompts_per_image"),
        ({"image_size": 65}, "args.json: image size 65"),
    ],
)
def test_resume_of_a_run_whose_arguments_are_damaged_is_a_message(tmp_path, synthetic_root, capsys, damage, message):
    argv = flags(tmp_path, synthetic_root, "--name=args", "--max-iterations=2")
    run(argv)
    path = tmp_path / "ck" / "args" / "args.json"
    if isinstance(damage, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **damage}))
    else:
        path.write_text(damage)
    resume = [flag for flag in argv if not flag.startswith("--image-size")]  # as stored, not given again
    assert train.main([*resume, "--resume", "--max-iterations=4"]) == 2
    error = capsys.readouterr().err
    assert message in error and "the run's arguments are damaged" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda state: {"format": state["format"]}, "train_state.pt is damaged (its decoder, optimizer, scheduler"),
        (lambda state: {**state, "step": "3"}, "train_state.pt is damaged (its step '3' is not an iteration)"),
        (lambda state: {**state, "step": -5}, "train_state.pt is damaged (its step -5 is not an iteration)"),
        (lambda state: {**state, "decoder": {"bogus": torch.zeros(1)}}, "train_state.pt does not fit this run"),
    ],
)
def test_resume_from_a_damaged_training_state_is_a_message(tmp_path, synthetic_root, capsys, edit, message):
    argv = flags(tmp_path, synthetic_root, "--name=state", "--max-iterations=2")
    run(argv)
    path = tmp_path / "ck" / "state" / "train_state.pt"
    torch.save(edit(torch.load(path, weights_only=True)), path)
    assert train.main([*argv, "--resume", "--max-iterations=4"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_existing_run_and_conflicting_resume_flags_are_refused(tmp_path, synthetic_root, capsys):
    argv = flags(tmp_path, synthetic_root, "--name=once", "--max-iterations=2")
    run(argv)
    with pytest.raises(train.TrainingError, match="already holds a run.*--resume"):
        run(argv)
    with pytest.raises(train.TrainingError, match=r"--lr=0.5 \(run has 0.001\)"):
        run([*argv, "--resume", "--lr=0.5"])
    assert train.main([*argv, "--resume"]) == 0  # already at --max-iterations: nothing to do
    with pytest.raises(train.TrainingError, match="no checkpoint yet"):
        run(flags(tmp_path, synthetic_root, "--name=never", "--resume"))


def test_resume_of_a_run_older_than_a_flag_keeps_the_flags_default(tmp_path, synthetic_root):
    argv = flags(tmp_path, synthetic_root, "--name=old", "--max-iterations=2")
    run(argv)
    args_file = tmp_path / "ck" / "old" / "args.json"
    stored = json.loads(args_file.read_text())
    for newer_flag in ("whole_image_prob", "dropout"):
        del stored[newer_flag]
    args_file.write_text(json.dumps(stored))
    assert run([*argv, "--resume", "--max-iterations=3"]).step == 3


def test_resume_of_a_run_from_before_precision_keeps_its_amp_choice(tmp_path, synthetic_root, monkeypatch):
    """Runs whose args.json holds amp (true/false) and no precision resume as --precision bf16/fp32."""
    argv = flags(tmp_path, synthetic_root, "--name=amp", "--max-iterations=2")
    run(argv)
    args_file = tmp_path / "ck" / "amp" / "args.json"
    stored = json.loads(args_file.read_text())
    assert stored["precision"] == "bf16" and "amp" not in stored  # the default: mixed precision where native
    del stored["precision"]
    args_file.write_text(json.dumps({**stored, "amp": False}))
    asked = []
    monkeypatch.setattr(training, "amp_dtype", lambda device, amp: asked.append(amp))
    assert run([*argv, "--resume", "--max-iterations=3"]).step == 3 and asked == [False]
    args_file.write_text(json.dumps({**stored, "amp": True}))
    with pytest.raises(train.TrainingError, match=r"--precision=fp32 \(run has bf16\)"):
        run([*argv, "--resume", "--no-amp", "--max-iterations=4"])
    assert run([*argv, "--resume", "--amp", "--max-iterations=4"]).step == 4 and asked == [False, True]
