"""clipseg/loading.py: what --model names resolves to one source, the same in every command (a run name, a run or
checkpoint directory, a hub id, an original .pth), with messages that say what exists; a model that cannot be loaded
is a LoadError naming it. The commands' messages and exit statuses: tests/test_cli.py and each command's tests."""

import shutil

import pytest

from clipseg.loading import DEFAULT_MODEL, LoadError, available_runs, load_model, resolve_model


def test_a_run_name_a_directory_and_a_checkpoint_inside_resolve(tiny_checkpoints, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, checkpoints)
    assert available_runs(checkpoints) == ["demo"]
    run = checkpoints / "demo"
    assert resolve_model("demo", checkpoints) == (str(run), run)
    assert resolve_model(str(run), tmp_path / "elsewhere") == (str(run), run)
    (run / "best").mkdir(exist_ok=True)
    (run / "best" / "config.json").write_text((run / "config.json").read_text())
    assert resolve_model("demo", checkpoints, "best") == (str(run / "best"), run / "best")
    with pytest.raises(LoadError, match=r"no trained model in .*iter_000500 .*models in .*demo: the latest, best"):
        resolve_model("demo", checkpoints, "iter_000500")
    (checkpoints / "stopped").mkdir()  # a run that stopped before its first checkpoint: only args.json
    (checkpoints / "stopped" / "args.json").write_text("{}")
    with pytest.raises(
        LoadError, match=r"no trained model in .*stopped \(config.json missing\): a run writes its model"
    ):
        resolve_model("stopped", checkpoints)


def test_a_run_name_wins_over_a_same_named_folder_here(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # not a model
    assert resolve_model("demo", tiny_checkpoints) == (str(tiny_checkpoints / "demo"), tiny_checkpoints / "demo")


def test_hub_ids_and_original_weights_pass_through_and_what_is_missing_is_named(tiny_checkpoints, tmp_path):
    assert resolve_model(DEFAULT_MODEL, tiny_checkpoints) == (DEFAULT_MODEL, None)
    weights = tmp_path / "rd64-uni.pth"
    weights.write_bytes(b"")
    assert resolve_model(str(weights), tiny_checkpoints) == (str(weights), None)
    with pytest.raises(LoadError, match=r"nope is neither a run in .* nor a directory\. Runs in .*: demo\. --model"):
        resolve_model("nope", tiny_checkpoints)
    with pytest.raises(LoadError, match=r"gone: no such directory or file\. Runs in"):
        resolve_model(str(tmp_path / "gone"), tiny_checkpoints)
    with pytest.raises(LoadError, match=r"gone\.pth: no such file \(an original \.pth decoder"):
        resolve_model(str(tmp_path / "gone.pth"), tiny_checkpoints)
    with pytest.raises(LoadError, match="not inside the hub id CIDAS/clipseg-rd64-refined"):
        resolve_model(DEFAULT_MODEL, tiny_checkpoints, "best")
    with pytest.raises(LoadError, match="rd64-uni.pth is a file"):
        resolve_model(str(weights), tiny_checkpoints, "best")
    with pytest.raises(LoadError, match=r"Runs in .*: none yet \(train one with train.py --name NAME\)"):
        resolve_model("demo", tmp_path / "no_runs")


def test_a_model_that_cannot_be_loaded_is_a_load_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match=f"cannot load the model {broken}: "):
        load_model(str(broken), None, "cpu")
    with pytest.raises(LoadError, match="cannot load the model owner/not-cached: .*a hub id is fetched once"):
        load_model("owner/not-cached", None, "cpu")


def test_the_papers_run_names_with_a_plus_are_run_names(tiny_checkpoints, tmp_path):
    """README: `python train.py --name=pc+ --mix`, then `python score.py pc+ --data phrasecut --prompt-kind visual`."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints / "demo", checkpoints / "pc+")
    assert resolve_model("pc+", checkpoints) == (str(checkpoints / "pc+"), checkpoints / "pc+")


def test_a_hub_id_missing_from_the_cache_offline_says_so(monkeypatch, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as the Makefile sets), the released model not yet fetched was reported as
    "has no config.json: is it a CLIPSeg checkpoint?"."""
    import huggingface_hub.constants

    from clipseg.weights import resolve_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="'nobody/no-model' is not in the local HF cache, and HF_HUB_OFFLINE"):
        resolve_file("nobody/no-model", "config.json")
