"""clipseg/cli.py, the commands' shared conventions (README, "Command-line conventions"): the same model flags with the
same --help in every command that loads a model, --precision and its --amp/--no-amp alias in every command that runs
one, --out a folder everywhere, renamed flags that say their new name, the documented command lines, and the exit
statuses (0 done, 1 nothing could be processed or kept, 2 bad usage or input such as a model that cannot be loaded):
status 2 for an unloadable model on every command's own process, status 1 per command (train.py's: test_train.py
and test_train_resume.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPU_CLASSES, random_image, simulate_cpu

import app
import bench
import export
import failure_test
import predict
import score
import train
from clipseg.cli import BACKEND_HELP, MODEL_HELP

REPO = Path(__file__).resolve().parents[1]
LOADS_A_MODEL = {"score.py": score.main, "failure_test.py": failure_test.main, "predict.py": predict.main,
                 "app.py": app.main, "export.py": export.main}  # fmt: skip
RUNS_A_MODEL = {**{k: v for k, v in LOADS_A_MODEL.items() if k != "export.py"}, "train.py": train.main}
WRITES_TO_OUT = {k: v for k, v in {**LOADS_A_MODEL, "bench.py": bench.main}.items() if k != "app.py"}
MODEL_FLAGS = ("--model", "--checkpoint", "--backbone", "--checkpoints-dir")


def help_entries(main, monkeypatch, capsys) -> dict[str, str]:
    """Each option's entry in the command's --help (its flags, metavar and help, whitespace collapsed), by its first
    flag. A wide terminal, so that argparse never breaks a word."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_every_command_that_loads_a_model_has_the_same_model_flags_and_help(monkeypatch, capsys):
    helps = {command: help_entries(main, monkeypatch, capsys) for command, main in LOADS_A_MODEL.items()}
    for flag in MODEL_FLAGS:
        texts = {command: entries.get(flag) for command, entries in helps.items()}
        assert len(set(texts.values())) == 1 and None not in texts.values(), (flag, texts)
    assert helps["score.py"]["--model"] == f"--model MODEL {' '.join(MODEL_HELP.split())}"
    assert "(default CIDAS/clipseg-rd64-refined, the released weights)" in helps["app.py"]["--model"]


def test_every_command_that_runs_a_model_has_precision_and_the_same_amp(monkeypatch, capsys):
    helps = {command: help_entries(main, monkeypatch, capsys) for command, main in RUNS_A_MODEL.items()}
    amp = {helps[command]["--amp"] for command in helps}
    assert len(amp) == 1 and "--amp = --precision bf16, --no-amp = --precision fp32" in amp.pop()
    precision = {command: helps[command]["--precision"] for command in helps}
    assert precision["score.py"] == precision["failure_test.py"] and "fp32 (the default" in precision["score.py"]
    assert precision["predict.py"] == precision["app.py"] and "bf16 with AMX, int8 with VNNI" in precision["app.py"]
    assert (
        precision["train.py"].startswith("--precision {fp32,bf16}")
        and "validation runs in fp32" in (precision["train.py"])
    )


def test_every_command_that_runs_a_model_has_the_same_device_flag(monkeypatch, capsys):
    helps = {command: help_entries(main, monkeypatch, capsys) for command, main in RUNS_A_MODEL.items()}
    device = "--device DEVICE torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu"
    assert all(helps[command]["--device"].startswith(device) for command in helps), {
        c: h["--device"] for c, h in helps.items()
    }
    assert "the exported backends run on the CPU" in helps["predict.py"]["--device"]


def test_every_command_that_runs_a_model_has_the_same_backend_flag(monkeypatch, capsys):
    helps = {command: help_entries(main, monkeypatch, capsys) for command, main in RUNS_A_MODEL.items()}
    backend = {command: entries.get("--backend") for command, entries in helps.items() if command != "train.py"}
    assert backend["score.py"] == backend["failure_test.py"] and backend["predict.py"] == backend["app.py"], backend
    assert backend["score.py"].startswith("--backend {torch,onnx,openvino} default torch. torch: the model in PyTorch;")
    assert backend["app.py"].startswith("--backend {auto,torch,onnx,openvino} auto (the default, or $CLIPSEG_BACKEND")
    shared = " ".join(BACKEND_HELP.split())
    assert all(text.endswith(shared) for text in backend.values()), backend


def test_out_is_a_folder_in_every_command(monkeypatch, capsys, tmp_path):
    for command, main in WRITES_TO_OUT.items():
        assert help_entries(main, monkeypatch, capsys)["--out"].startswith("--out DIR "), command
        with pytest.raises(SystemExit) as exit_info:  # refused as it is read, before any other check
            main(["--out", str(tmp_path / "results.json")])
        assert exit_info.value.code == 2, command
        assert "argument --out: must name a folder (the command writes its files into it), not a file such as" in (
            capsys.readouterr().err
        ), command


@pytest.mark.parametrize(("capabilities", "cpu_class", "fastest"), CPU_CLASSES)
def test_each_job_takes_its_default_precision_on_each_cpu_class(monkeypatch, capabilities, cpu_class, fastest):
    """Prediction: the rule's precision for the simulated CPU class; scoring and failure analysis: fp32 everywhere;
    training: bf16 mixed precision (fp32 where the CPU would emulate it, clipseg/training.py)."""
    simulate_cpu(monkeypatch, capabilities)
    cpu = ["--device", "cpu"]
    assert predict.parse_args(["in.png", "--prompt", "a cat", *cpu]).precision == fastest
    assert app.parse_args(cpu).precision == fastest
    assert score.parse_args(["pc", *cpu]).precision == failure_test.parse_args(cpu).precision == "fp32"
    assert train.parse_args(["--name=pc", "--batch-size=64", *cpu]).precision == "bf16"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pc", "--prompt", "visual"], "--prompt was renamed --prompt-kind (visual or text; predict.py's --prompt is"),
        (["pc", "--prompt"], "--prompt was renamed --prompt-kind"),
        (["pc", "--splits", "hsnet/data"], "--splits was renamed --splits-dir"),
    ],
)
def test_score_flags_renamed_for_one_meaning_everywhere_say_their_new_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        score.parse_args(argv)
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_the_documented_command_lines_keep_working():
    assert train.parse_args(["--name=pc", "--batch-size=64"]).precision == "bf16"  # mixed precision where native
    assert score.parse_args(["pc"]).model == score.parse_args(["--model", "pc"]).model == "pc"
    assert failure_test.parse_args([]).model is None  # the default, the released weights
    assert score.parse_args(["pc", "--prompt-kind", "visual", "--splits-dir", "d"]).prompt_kind == "visual"
    assert export.parse_args(["CIDAS/clipseg-rd64-refined", "exported"]).out == "exported"  # the older positional form


# ------------------------------------------------------------------------------- exit statuses, as processes


def start_command(script: str, *argv: str, cwd: Path) -> subprocess.Popen:
    """The command as a process of its own (several run side by side: each spends seconds importing torch)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """The process's exit status and what it wrote to stderr."""
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


@pytest.fixture
def broken_model(tmp_path) -> Path:
    """A model directory whose config.json is not JSON: it resolves, but cannot be loaded."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    return model


@pytest.mark.slow
def test_a_model_that_cannot_be_loaded_exits_2_in_every_command(broken_model, tmp_path):
    """The status the process ends with (score.py and failure_test.py once exited 1 here)."""
    random_image(32, 32).save(tmp_path / "in.png")
    model = ["--model", str(broken_model)]
    argv = {
        "score.py": [*model, "--out", "scores"],
        "failure_test.py": [*model, "--out", "failures"],
        "predict.py": ["in.png", "--prompt", "a cat", *model, "--precision", "fp32"],
        "export.py": [*model, "--out", "exported"],
        "app.py": [*model, "--precision", "fp32", "--port", "1"],  # never served: the model fails first
        "train.py": ["--name=run", f"--init={broken_model}", "--data=synthetic", "--data-root=none"],
    }
    if subprocess.run([sys.executable, "-c", "import gradio"], capture_output=True).returncode:
        del argv["app.py"]  # app.py exits 2 without Gradio too, for another reason
    processes = {command: start_command(command, *args, cwd=tmp_path) for command, args in argv.items()}
    for command, process in processes.items():
        status, stderr = finish(process)
        assert status == 2 and "Traceback" not in stderr, (command, stderr[-2000:])
        assert re.search(f"error: .*{re.escape(str(broken_model))}", stderr), (command, stderr[-2000:])


def test_bad_usage_exits_2_and_nothing_to_process_exits_1(tmp_path):
    bad_usage = start_command("predict.py", "in.png", "--prompt", "a cat", "--out", "results.json", cwd=tmp_path)
    nothing = start_command("predict.py", "missing.png", "--prompt", "a cat", cwd=tmp_path)
    status, stderr = finish(bad_usage)
    assert status == 2 and "argument --out: must name a folder" in stderr
    status, stderr = finish(nothing)
    assert status == 1 and "error: no readable input images" in stderr
    assert (tmp_path / "predictions" / "summary.json").is_file()  # the reason, written before any model is loaded


# ----------------------------------------------------------------------------- documented command lines


PARSERS = {"score.py": score.parse_args, "failure_test.py": failure_test.parse_args, "predict.py": predict.parse_args,
           "app.py": app.parse_args, "export.py": export.parse_args, "train.py": train.parse_args}  # fmt: skip


def documented_command_lines() -> list[tuple[str, str, list[str]]]:
    """(where, command, argv) of every `python <command>.py ...` line in the README's code blocks and in the
    commands' docstrings (continuation lines joined, comments dropped); bench.py's, which measure as they parse, are
    left out."""
    sources = {"README.md": "\n".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S))}
    sources.update({command: (REPO / command).read_text().split('"""')[1] for command in PARSERS})
    lines = []
    for where, text in sources.items():
        for line in text.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python "):
                words = shlex.split(line, comments=True)
                if words[1] in PARSERS:
                    lines.append((where, words[1], words[2:]))
    return lines


def test_the_documented_command_lines_use_the_current_flags(capsys, tmp_path, monkeypatch):
    lines = documented_command_lines()
    monkeypatch.chdir(tmp_path)  # where the example visual prompts exist (predict.py checks them as it parses)
    for _, _, argv in lines:
        for flag, value in zip(argv, argv[1:]):
            if flag == "--visual-prompt":
                for name in value.split(":"):
                    (tmp_path / name).touch()
    assert {command for _, command, _ in lines} == set(PARSERS)
    assert ("README.md", "score.py", ["pc"]) in [(where, command, argv[:1]) for where, command, argv in lines]
    refused = []
    for where, command, argv in lines:
        try:
            PARSERS[command](argv)
        except SystemExit:
            refused.append(f"{where}: python {command} {shlex.join(argv)}: {capsys.readouterr().err.splitlines()[-1]}")
    assert not refused, "\n".join(refused)


# ------------------------------------------------------------- exit status 1: ran, but nothing came of it


def test_nothing_scored_exits_1_in_score_and_failure_test(tiny_checkpoints, damaged_root, tmp_path, capsys):
    for image in (damaged_root / "data" / "VGPhraseCut_v0" / "images").iterdir():
        image.write_bytes(b"not an image")
    argv = ["demo", "--checkpoints-dir", str(tiny_checkpoints), "--data", "synthetic", "--data-root", str(damaged_root),
            "--limit", "2", "--num-workers", "0"]  # fmt: skip
    for main, command_argv in (
        (score.main, [*argv, "--out", str(tmp_path / "scores")]),
        (failure_test.main, ["--name", *argv, "--out", str(tmp_path / "failures")]),
    ):
        with pytest.warns(UserWarning, match="skipped task"), pytest.raises(SystemExit) as exit_info:
            main(command_argv)
        assert exit_info.value.code == 1 and "error: no sample could be scored (2 skipped)" in capsys.readouterr().err


def test_an_export_that_cannot_be_kept_exits_1(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    def disagreeing(*args, **kwargs):
        raise RuntimeError("the ONNX graphs differ from PyTorch by 1e-1 of the values' scale")

    monkeypatch.setattr(export, "export", disagreeing)
    argv = ["--model", "demo", "--checkpoints-dir", str(tiny_checkpoints), "--out", str(tmp_path / "exported")]
    assert export.main(argv) == 1 and "error: the ONNX graphs differ from PyTorch" in capsys.readouterr().err


def test_bench_results_that_cannot_be_saved_exit_1(tmp_path, monkeypatch, capsys):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "measure", lambda args, results: results.update(rows=[]))
    monkeypatch.setattr(bench, "write_json", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 1 and "the results above were not saved: " in capsys.readouterr().err
