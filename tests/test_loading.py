"""clipseg/loading.py: a run name or a model directory resolves to where the model is loaded from and where its
scores go; a run name and a model together are refused. The commands' messages: tests/test_score.py."""

import pytest

from clipseg.loading import LoadError, available_runs, resolve_model


def test_runs_are_listed_and_a_name_or_a_directory_resolves(tiny_checkpoints):
    checkpoints = tiny_checkpoints
    assert available_runs(checkpoints) == ["demo"]
    with pytest.raises(LoadError, match="not both"):
        resolve_model("demo", "CIDAS/clipseg-rd64-refined", checkpoints)
    assert resolve_model(None, str(checkpoints / "demo"), checkpoints) == (
        str(checkpoints / "demo"),
        checkpoints / "demo",
    )
