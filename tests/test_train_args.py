"""train_args.py: train.py's flags, their checks and help, and the demo's flags in the Makefile."""

import re
from pathlib import Path

import pytest

import train
from clipseg import train_args
from clipseg.distributed import Distributed
from clipseg.runs import RunFiles

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch-size=0", "--batch-size: must be a positive integer"),
        ("--lr=-1", "--lr/--learning-rate: must be a positive number"),
        ("--negative-prob=1.5", "--negative-prob: must be a probability"),
        ("--image-size=100", "image size 100 is not a multiple of the patch size 16 of the backbone: use 96 or 112"),
        ("--image-size=1600000", "image size 1600000 is not a side from 1 to 4096 pixels"),
        ("--lrs=linear", "--lrs: invalid choice"),
        ("--data=coco", "--data: invalid choice"),
        ("--name=../escape", "--name: must be a plain directory name"),
        ("--name=+x", "--name: must be a plain directory name"),
        ("--extract-layers=6,3", "--extract-layers: must be strictly increasing"),
        ("--wd=nan", "--wd: must be a number >= 0"),
        ("--data=folder", "--data=folder needs --data-root"),
        ("--dropout=1", "--dropout: must be in [0, 1)"),
        ("--whole-image-prob=2", "--whole-image-prob: must be a probability"),
        ("--reduce-dim=1000000000", "--reduce-dim: must be at most 4096, got 1000000000"),
        ("--tiny-width=99999999", "--tiny-width: must be at most 1024"),
        ("--tiny-width=63", "--tiny-width must be even (the tiny backbone has 2 attention heads), got 63"),
        ("--tiny-layers=100000", "--tiny-layers: must be at most 48"),
    ],
)
def test_invalid_flags_are_argparse_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_args.parse_args([flag])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_makefiles_demo_flags_parse_and_match_the_docstring():
    makefile = (REPO / "Makefile").read_text()
    demo = re.search(r"^DEMO_TRAIN \?= ((?:.*\\\n)*.*)$", makefile, re.M).group(1).replace("\\\n", " ").split()
    args = train_args.parse_args(["--name=demo", "--data=synthetic", *demo])
    assert (args.backbone, args.image_size, args.precision, args.extract_layers) == ("tiny", 128, "fp32", (0, 1, 2))
    assert args.whole_image_prob == 0.5 and args.max_iterations == 4400
    documented = train.__doc__[train.__doc__.index("--name=demo") :].split("Everything a run writes")[0]
    assert set(demo) <= set(documented.replace("\\", " ").split())


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_args.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in train_args.build_parser()._actions:
        assert action.help, action.dest
    for flag in ("--batch-size", "--resume", "--init", "--mix", "--precision", "--amp", "--no-amp", "--learning-rate"):
        assert flag in text


def test_precision_default_amp_and_no_amp():
    """Training keeps mixed precision (bf16 where native) by default; --amp/--no-amp are --precision bf16/fp32."""
    assert train_args.parse_args([]).precision == "bf16"
    assert train_args.parse_args(["--amp"]).precision == "bf16"
    no_amp = train_args.parse_args(["--no-amp"])
    assert no_amp.precision == "fp32" and "precision" in no_amp.explicit and not hasattr(no_amp, "amp")
    assert train_args.parse_args(["--precision=fp32"]).precision == "fp32"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--precision=int8"], "--precision: invalid choice: 'int8'"),
        (["--precision=bf16", "--no-amp"], "--no-amp means --precision fp32; it contradicts --precision bf16"),
        (["--init=nope"], "--init: nope is neither a run in checkpoints/ nor a directory"),
    ],
)
def test_bad_precision_and_init_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_args.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_init_takes_what_every_commands_model_takes(tiny_checkpoints, tmp_path):
    """A run name under --checkpoints-dir, a directory or a hub id (resolved, not loaded)."""
    flags = [f"--checkpoints-dir={tiny_checkpoints}", "--name=new"]
    assert train_args.parse_args([*flags, "--init=demo"]).init == str(tiny_checkpoints / "demo")
    assert train_args.parse_args([*flags, f"--init={tiny_checkpoints / 'demo'}"]).init == str(tiny_checkpoints / "demo")
    assert train_args.parse_args([*flags, "--init=CIDAS/clipseg-rd64-refined"]).init == "CIDAS/clipseg-rd64-refined"


def test_a_run_name_may_hold_a_plus_as_the_papers_pc_plus():
    assert train_args.parse_args(["--name=pc+", "--mix"]).name == "pc+"


def test_resume_keeps_the_runs_plan_unless_given_again_and_takes_the_machines_flags_from_this_call(tmp_path):
    """`train.py --name=pc --resume` continues the run as planned: its --max-iterations, --ckpt, --log-every and
    --keep-checkpoints are the stored ones (they were reset to the defaults, so a finished 4,400-iteration demo
    trained on to 20,000); given again they change. --num-workers, --device, --compile are this call's."""
    ck = f"--checkpoints-dir={tmp_path}"
    planned = train.parse_args(["--name=r", ck, "--max-iterations=12", "--ckpt=4", "--log-every=3", "--num-workers=3"])
    files = RunFiles(tmp_path / "r")
    files.dir.mkdir()
    train_args.write_args(files, planned, Distributed())
    files.state.write_bytes(b"")  # only its presence matters here
    resumed = train_args.stored_args(files, train.parse_args(["--name=r", ck, "--resume"]))
    assert (resumed.max_iterations, resumed.ckpt, resumed.log_every) == (12, 4, 3)
    assert resumed.num_workers == train.parse_args(["--name=r"]).num_workers  # the machine's: this call's default
    longer = train_args.stored_args(files, train.parse_args(["--name=r", ck, "--resume", "--max-iterations=20"]))
    assert (longer.max_iterations, longer.ckpt) == (20, 4)


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (64, 4)])
def test_the_default_workers_leave_a_core_to_the_training_step(monkeypatch, cores, workers):
    from clipseg import sampling

    monkeypatch.setattr(sampling, "usable_cores", lambda: cores)
    assert sampling.default_workers() == workers
    monkeypatch.setattr(train_args, "default_workers", sampling.default_workers)
    assert train.parse_args(["--name=r"]).num_workers == workers
