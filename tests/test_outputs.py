"""outputs.py: atomic writes, strict JSON, output paths checked up front, file names that cannot leave their folder,
printable labels."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipseg.outputs import (
    LockHeld,
    UnwritableOutput,
    atomic_write,
    check_writable,
    exclusive_lock,
    is_safe_name,
    json_text,
    printable,
    read_regular,
    safe_name,
    write_json,
    write_text,
)

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


def test_json_is_strict_and_names_the_value_that_is_not_a_number(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"ok": 1.5})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"value\['rows'\]\[1\]\['max'\] = -?(nan|inf) is not a finite number"):
            write_json(path, {"rows": [{"max": 0.5}, {"max": bad}]})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"ok": 1.5} and len(os.listdir(tmp_path)) == 1
    assert json_text({"a": None, "b": [1, 2.5]}) == '{"a": null, "b": [1, 2.5]}'


def test_a_file_name_that_is_not_utf8_is_written_as_json_and_reads_back(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes, as Python decodes them: lone surrogates
    write_json(tmp_path / "s.json", {"image": name, "prompt": "café"})
    text = (tmp_path / "s.json").read_text(encoding="utf-8")
    assert "\\udce9" in text and "café" in text  # escaped; real non-ASCII text kept as it is
    assert os.fsencode(json.loads(text)["image"]) == b"caf\xe9 \xff.png"


def test_read_regular_reads_only_a_bounded_regular_file(tmp_path):
    (tmp_path / "ok").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "ok")
    assert read_regular(tmp_path / "ok", 5) == read_regular(tmp_path / "link", 5) == b"12345"
    with pytest.raises(OSError, match="5 bytes, more than the 4 expected"):
        read_regular(tmp_path / "ok", 4)
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: reading would wait for ever
    (tmp_path / "zero").symlink_to("/dev/zero")  # reading would never end
    for name in ("fifo", "zero"):
        with pytest.raises(OSError, match="not a regular file"):
            read_regular(tmp_path / name, 1 << 30)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 5)


def refuse(constant):
    raise AssertionError(f"{constant} is not JSON")


def test_check_writable_finds_what_blocks_an_output_before_any_work(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    for path, folder, message in [
        (tmp_path / "file.txt" / "scores.json", False, "file.txt is a file, not a folder"),
        (tmp_path / "file.txt" / "deeper" / "out", True, "file.txt is a file, not a folder"),
        (tmp_path / "file.txt", True, "file.txt is a file, not a folder"),
        (tmp_path / "folder", False, "it is a folder"),
        (Path("/proc/no-such-dir/scores.json"), False, "cannot write /proc/no-such-dir/scores.json"),
    ]:
        with pytest.raises(UnwritableOutput, match=message):
            check_writable(path, folder=folder)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    check_writable(tmp_path / "new" / "deeper" / "scores.json")
    check_writable(tmp_path / "new2" / "out", folder=True)
    check_writable(tmp_path / "file.txt")  # an existing file is replaced atomically: its folder is what counts
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # probing leaves nothing behind


def test_an_exclusive_lock_is_refused_while_another_process_holds_it(tmp_path):
    script = (
        "import sys, time\nfrom clipseg.outputs import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(30)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for path in (tmp_path / "a.lock", tmp_path):  # a lock file (made) or a folder itself
        holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, env=env)
        try:
            assert holder.stdout.readline() == b"held\n"
            with pytest.raises(LockHeld, match="is locked by another process"):
                with exclusive_lock(path, wait=False):
                    pass
        finally:
            holder.kill()
            holder.wait()
        with exclusive_lock(path, wait=False):  # released when its holder died
            pass
