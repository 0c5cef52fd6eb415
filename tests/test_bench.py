"""bench.py: an --out that cannot be written is refused before anything is measured."""

import pytest

import bench


def test_an_unwritable_out_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *args: pytest.fail("measured although --out cannot be written"))
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "a_file is a file, not a folder" in capsys.readouterr().err
