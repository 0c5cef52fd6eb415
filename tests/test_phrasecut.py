"""clipseg/phrasecut.py: a split's JSON parsed once into memory-mapped arrays, cached, rebuilt when it changes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import data_dir, refer

import dataset
from clipseg import phrasecut as phrasecut_index

REPO = Path(__file__).resolve().parents[1]


def test_index_is_cached_and_rebuilt_when_the_json_changes(damaged_root, monkeypatch):
    first = dataset.PhraseCut(damaged_root, "val", train=False)
    assert (data_dir(damaged_root) / ".clipseg_index" / "val" / "meta.json").is_file()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the JSON was parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(phrasecut_index, "iter_json_array", no_parsing)
        cached = dataset.PhraseCut(damaged_root, "val", train=False)
        assert [t["task_id"] for t in cached.tasks] == [t["task_id"] for t in first.tasks]
    tasks = refer(damaged_root, "val")[:2]
    (data_dir(damaged_root) / "refer_val.json").write_text(json.dumps(tasks))
    assert len(dataset.PhraseCut(damaged_root, "val", train=False)) == 2


@pytest.mark.parametrize(
    ("name", "damage"),
    [("meta.json", b"[1]"), ("meta.json", b"{x"), ("meta.json", b""), ("points.bin", b"\0" * 8)],
)
def test_a_damaged_index_is_built_again(damaged_root, name, damage):
    first = dataset.PhraseCut(damaged_root, "val", train=False)
    (data_dir(damaged_root) / ".clipseg_index" / "val" / name).write_bytes(damage)
    again = dataset.PhraseCut(damaged_root, "val", train=False)
    assert [t["task_id"] for t in again.tasks] == [t["task_id"] for t in first.tasks]
    assert json.loads((data_dir(damaged_root) / ".clipseg_index" / "val" / "meta.json").read_text())["arrays"]


def test_processes_opening_a_fresh_split_at_once_build_one_index(damaged_root):
    """The ranks of a torchrun job open a split whose index is not built yet at the same moment: one builds it
    while the others wait (two building at once removed each other's index while it was being opened)."""
    script = (
        "import sys, pathlib, time\nfrom clipseg import phrasecut\nbuild = phrasecut._build_index\n"
        "phrasecut._build_index = lambda *args: print('built', file=sys.stderr) or time.sleep(3) or build(*args)\n"
        "print(len(phrasecut.load_task_table(pathlib.Path(sys.argv[1]), 'train')))"
    )
    folder = data_dir(damaged_root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(3)
    ]
    results = [(job.wait(timeout=120), *job.communicate()) for job in jobs]
    assert [code for code, *_ in results] == [0, 0, 0], [err.decode()[-800:] for *_, err in results]
    assert len({out for _, out, _ in results}) == 1
    assert sum(err.decode().count("built") for *_, err in results) == 1  # the others waited and opened it
    assert len(list((folder / ".clipseg_index").glob(".train-building-*"))) == 0


def test_index_falls_back_to_user_cache_when_data_dir_is_read_only(damaged_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_writable = phrasecut_index._writable
    monkeypatch.setattr(phrasecut_index, "_writable", lambda d: ".clipseg_index" not in str(d) and real_writable(d))
    data = dataset.PhraseCut(damaged_root, "test", train=False)
    assert len(data) == len(refer(damaged_root, "test"))
    assert list((tmp_path / "cache" / "clipseg").glob("phrasecut-*/test/meta.json"))
    assert not (data_dir(damaged_root) / ".clipseg_index").exists()


def test_streaming_json_reader_matches_json_load(tmp_path):
    tasks = [{"task_id": f"{i}", "phrase": "é " * i, "Polygons": [[[1.5, 2.0]]]} for i in range(50)]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks, indent=1))
    assert list(phrasecut_index.iter_json_array(path, chunk_chars=7)) == tasks
    path.write_text(json.dumps(tasks)[:-40])
    with pytest.raises(ValueError, match="tasks.json.*re-download"):
        list(phrasecut_index.iter_json_array(path, chunk_chars=64))


@pytest.mark.parametrize(
    ("points", "defect"),
    [
        ([[0, 0], [10, 0], [0, 10]], None),
        ([[0, 0], [10, 10], [10, 0], [0, 10]], None),  # a bow tie: its signed areas cancel, yet it draws two triangles
        ([[0, 0], [1e-13, 1e-13], [5, 0], [5, 5]], None),  # nearly repeated vertices, then a real triangle
        ([[0, 0], [1, 1], [2, 2], [5, 5]], phrasecut_index.ZERO_AREA),  # all on one line
        ([[3, 3], [3, 3], [3, 3]], phrasecut_index.ZERO_AREA),
        ([[0, 0], [5, 5]], phrasecut_index.ZERO_AREA),
        ([], phrasecut_index.ZERO_AREA),
        ([[0, 0], [float("nan"), 1], [3, 3]], phrasecut_index.NON_FINITE),
        ([[0, 0], [float("inf"), 1], [3, 3]], phrasecut_index.NON_FINITE),
        ([[0, 0], [1e30, 0], [0, 1e30]], phrasecut_index.NON_FINITE),  # corrupt: far beyond any image
        ([[0, 0], [-(2.0**24) - 1, 0], [0, 5]], phrasecut_index.NON_FINITE),
        ([[0, 0], [2.0**24, 0], [0, 5]], None),  # the last coordinate accepted
    ],
)
def test_polygon_defect(points, defect):
    assert phrasecut_index.polygon_defect([v for point in points for v in point]) == defect
