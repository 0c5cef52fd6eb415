"""outputs.py: atomic writes, file names that cannot leave their folder, printable labels."""

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outputs import atomic_write, is_safe_name, printable, safe_name, write_json, write_text

NASTY = ["../../etc/passwd", "/", "..", ".", "a\x00b", "x" * 500, "猫 on the mat", "CON", "con.txt", "a/b\\c:d*e?", ""]


@pytest.mark.parametrize("text", NASTY)
def test_nasty_names_never_escape_the_output_folder(text, tmp_path):
    name = safe_name(text)
    assert name and name not in (".", "..") and name.isascii() and len(name) <= 80 and is_safe_name(name)
    assert not set(name) & set('/\\:*?"<>|\x00') and not name.startswith((".", "-"))
    assert (tmp_path / f"{name}.png").resolve().parent == tmp_path.resolve()


def test_plain_names_are_kept_and_others_get_a_readable_slug_and_hash():
    assert safe_name("2345__101_102") == "2345__101_102"  # PhraseCut's <task_id>.png
    assert safe_name("img-7.v2") == "img-7.v2"
    assert safe_name("A cat").startswith("a-cat~") and safe_name("A cat") != safe_name("a cat")
    assert not is_safe_name("../x") and not is_safe_name("a cat")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_distinct_texts_get_distinct_safe_names(first, second):
    name = safe_name(first)
    assert is_safe_name(name) and name not in (".", "..")
    if first != second:
        assert name != safe_name(second)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"a": 1} and sorted(os.listdir(path.parent)) == ["result.json"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "x.txt", "é")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "é"


def test_printable_flattens_and_cuts():
    assert printable("a\nb\tc\x00d") == "a b c d"
    assert printable("x" * 100, limit=10) == "x" * 9 + "…"
