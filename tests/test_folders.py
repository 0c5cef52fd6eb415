"""clipseg/folders.py: the streamed walk (images, skips, duplicates, shards), summary lines that survive a kill, the
merged summary (each image once, sorted, latest line), resuming (completed images skipped, half-written ones redone,
across world sizes), and memory that stays flat on a folder of 100,000 entries."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import NASTY_PROMPTS

from clipseg import folders
from clipseg.distributed import owner_of
from clipseg.folders import (
    SUMMARY_NAME,
    CompletedImages,
    InputEntry,
    SummaryLog,
    iter_inputs,
    merge_summaries,
    output_name,
    rank_summaries,
    rank_summary_path,
    read_summary,
    start_summaries,
)

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for path in paths:
        path.write_bytes(b"not really an image")
    return paths


def walk(inputs, owns=None) -> tuple[list[str], dict[str, str]]:
    """(image keys, {key: error}) of a walk."""
    entries = list(iter_inputs([str(i) for i in inputs], owns))
    return [e.key for e in entries if e.error is None], {e.key: e.error for e in entries if e.error}


# ------------------------------------------------------------------------------------------------- walking


def test_walk_yields_image_files_by_suffix_and_reports_what_cannot_be_read(tmp_path):
    folder = tmp_path / "photos"
    make_images(folder, ["a.jpg", "B.PNG", "c.webp", "notes.txt", "README"])
    (folder / "album.jpg").mkdir()  # a folder with an image's name
    (folder / "broken.png").symlink_to(folder / "gone.png")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.png")
    empty = tmp_path / "empty"
    make_images(empty, ["only.txt"])
    images, errors = walk([folder, empty, tmp_path / "missing.jpg"])
    assert sorted(images) == sorted(str(folder / n) for n in ("a.jpg", "B.PNG", "c.webp"))
    assert errors == {
        str(folder / "album.jpg"): "not a regular file",
        str(folder / "broken.png"): "broken symbolic link",
        str(folder / "loop.jpg"): "cannot read (Too many levels of symbolic links)",
        str(folder / "pipe.png"): "not a regular file",
        str(empty): "folder has no images (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp)",
        str(tmp_path / "missing.jpg"): "file not found",
    }


def test_a_folder_that_cannot_be_listed_is_a_skip(tmp_path, monkeypatch):
    make_images(tmp_path / "locked", ["a.jpg"])

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(folders.os, "scandir", refuse)
    assert walk([tmp_path / "locked"]) == ([], {str(tmp_path / "locked"): "cannot list the folder (Permission denied)"})


def test_each_file_is_read_once_whichever_way_it_is_reached(tmp_path):
    folder = tmp_path / "photos"
    a, b = make_images(folder, ["a.jpg", "b.jpg"])
    (outside,) = make_images(tmp_path / "elsewhere", ["x.png"])
    (folder / "link-to-a.jpg").symlink_to(a)  # a's own entry is read: the link is left out
    (folder / "x1.png").symlink_to(outside)  # two links to a file that no input walks: two images
    (folder / "x2.png").symlink_to(outside)
    images, errors = walk([folder, folder, a, tmp_path / "elsewhere" / ".." / "photos", b, b])
    assert errors == {}
    assert sorted(images) == sorted(str(folder / n) for n in ("a.jpg", "b.jpg", "x1.png", "x2.png"))
    single, _ = walk([b, b, outside])
    assert single == [str(b), str(outside)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_walk_disjoint_shards_that_cover_the_folder(tmp_path, world_size):
    folder = tmp_path / "photos"
    make_images(folder, [f"img{i:03d}.jpg" for i in range(60)])
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    everything = walk([folder])
    shards = [walk([folder], owns=lambda key, r=r: owner_of(key, world_size) == r) for r in range(world_size)]
    keys = [key for images, _ in shards for key in images]
    assert sorted(keys) == sorted(everything[0]) and len(keys) == len(set(keys)) == 60
    assert [errors for _, errors in shards if errors] == [everything[1]]  # the skip is reported by one rank
    if world_size > 1:
        assert all(images for images, _ in shards)  # 60 images: no rank is left without work


def test_output_names_of_nasty_file_names_are_safe_and_distinct():
    names = [output_name(Path(f"{p}.jpg"), several_inputs=False) for p in NASTY_PROMPTS]
    assert len(set(names)) == len(names) and all("/" not in name and name not in (".", "..") for name in names)


def test_output_names_depend_on_the_path_alone():
    assert output_name(Path("photos/cat.jpg"), several_inputs=False) == "cat.jpg"
    assert output_name(Path("photos/cat.png"), several_inputs=False) == "cat.png"
    assert output_name(Path("a/cat.jpg"), True) != output_name(Path("b/cat.jpg"), True)
    assert "/" not in output_name(Path("../../etc/passwd.png"), True)
    for own in ("summary.json", "summary.jsonl", "summary-rank3.jsonl", "run.json", "coco.json"):
        assert output_name(Path("photos") / own, several_inputs=False).startswith(own.replace(".", "-") + "~")


# ------------------------------------------------------------------------------------------- summary lines


def test_a_line_cut_short_by_a_kill_is_cut_off_when_the_file_is_opened_again(tmp_path):
    path = tmp_path / "summary-rank0.jsonl"
    with SummaryLog(path) as log:
        log.write({"image": "a.jpg", "prompts": []})
    with open(path, "ab") as handle:
        handle.write(b'{"image": "b.jpg", "pro')  # the kill
    with SummaryLog(path) as log:
        log.write({"image": "c.jpg", "prompts": []})
    assert [r["image"] for r in read_summary(path)] == ["a.jpg", "c.jpg"]
    path.write_bytes(b'{"image": "torn')  # no complete line at all
    SummaryLog(path).close()
    assert path.read_bytes() == b""


def test_a_write_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "summary-rank0.jsonl"
    log = SummaryLog(path)
    log.write({"image": "a.jpg"})
    before = path.read_bytes()
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folders.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        log.write({"image": "b.jpg"})
    assert path.read_bytes() == before
    monkeypatch.setattr(folders.os, "write", real_write)
    log.write({"image": "c.jpg"})
    log.close()
    assert [r["image"] for r in read_summary(path)] == ["a.jpg", "c.jpg"]


def test_summary_lines_are_strict_json_also_for_names_that_are_not_unicode(tmp_path):
    key = os.fsdecode(b"caf\xe9 \xe2\x80\xa8.jpg")  # latin-1 bytes (surrogate-escaped) and a line separator
    path = tmp_path / "summary-rank0.jsonl"
    with SummaryLog(path) as log:
        log.write({"image": key})
        log.write({"image": "猫.jpg"})
        with pytest.raises(ValueError, match="not a finite number"):
            log.write({"image": "x.jpg", "max_probability": float("nan")})
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b"" and "猫".encode() in lines[1]  # readable non-ASCII where possible
    assert [r["image"] for r in read_summary(path)] == [key, "猫.jpg"]


# ------------------------------------------------------------------------------------------------ merging


def test_merge_keeps_each_image_once_sorted_with_its_latest_line(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "FAN_IN", 2)  # several merge passes over many small runs
    out = tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    expected, sources = {}, [out / SUMMARY_NAME] + [rank_summary_path(out, r) for r in (0, 1, 2, 10)]
    for attempt, path in enumerate(sources):
        with SummaryLog(path) as log:
            for i in rng.permutation(40)[:25]:
                record = {"image": f"img{i:02d}.jpg", "attempt": attempt}
                if i % 7 == 0:
                    record["error"] = "unreadable"
                log.write(record)
                expected[record["image"]] = record
    with open(rank_summary_path(out, 10), "ab") as handle:
        handle.write(b'{"image": "img99.jpg"')  # cut short
    (out / ".merge-killed").mkdir()  # leftovers of a merge that was killed
    (out / f".{SUMMARY_NAME}.x1y2.tmp").write_bytes(b"{")
    counts = merge_summaries(out, run_bytes=200)
    merged = list(read_summary(out / SUMMARY_NAME))
    assert merged == [expected[key] for key in sorted(expected)]  # rank 10's lines come after rank 2's
    assert (counts.images, counts.errors) == (sum("error" not in r for r in merged), sum("error" in r for r in merged))
    assert counts.dropped == 5 * 25 - len(merged) + 1
    assert rank_summaries(out) == [] and sorted(p.name for p in out.iterdir()) == [SUMMARY_NAME]


# ------------------------------------------------------------------------------------------------ resuming


class Killed(Exception):
    pass


def run_rank(inputs, out: Path, rank: int = 0, world_size: int = 1, resume: bool = False, kill_after=None) -> list:
    """predict.py's loop for one rank, without the model: per image two output files, then its summary line.
    kill_after=k: stop like a kill after k images, with the next image's files half written. Returns the images
    processed."""
    owns = lambda key: owner_of(key, world_size) == rank  # noqa: E731
    completed = CompletedImages.load(out, owns) if resume else CompletedImages(np.empty(0))
    processed = []
    with SummaryLog(rank_summary_path(out, rank)) as log:
        for entry in iter_inputs(inputs, owns):
            if entry.error:
                log.write({"image": entry.key, "error": entry.error})
                continue
            folder = out / output_name(entry.path, several_inputs=len(inputs) > 1)
            files = [folder / "cat.mask.png", folder / "cat.prob.png"]
            if completed.is_complete(entry.key, files):
                continue
            folder.mkdir(exist_ok=True)
            files[0].write_bytes(entry.path.read_bytes())
            if len(processed) == kill_after:
                raise Killed(entry.key)
            files[1].write_bytes(b"probabilities")
            log.write({"image": entry.key, "files": [str(f.relative_to(out)) for f in files]})
            processed.append(entry.key)
    return processed


def run_job(inputs, out: Path, world_size: int, resume: bool = False) -> list:
    """All ranks of a job, one after the other: start (rank 0), every rank, merge (rank 0)."""
    start_summaries(out, resume)
    processed = [key for rank in range(world_size) for key in run_rank(inputs, out, rank, world_size, resume)]
    merge_summaries(out)
    return processed


def test_resume_skips_completed_images_and_redoes_half_written_ones_with_another_world_size(tmp_path):
    images = make_images(tmp_path / "photos", [f"img{i:02d}.jpg" for i in range(12)])
    (tmp_path / "photos" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    inputs, out = [str(tmp_path / "photos")], tmp_path / "out"
    start_summaries(out, resume=False)
    with pytest.raises(Killed) as killed:
        run_rank(inputs, out, kill_after=5)
    half_written = killed.value.args[0]
    log = rank_summary_path(out, 0)
    done_before = [r["image"] for r in read_summary(log) if "error" not in r]
    assert len(done_before) == 5 and half_written not in done_before
    with open(log, "ab") as handle:  # a kill while the 7th line was written: its files are there, its line is not
        handle.write(b'{"image": "' + str(images[0]).encode())

    redone = run_job(inputs, out, world_size=2, resume=True)
    assert sorted(redone) == sorted(set(map(str, images)) - set(done_before))  # 7 of 12, the half-written one too
    summary = list(read_summary(out / SUMMARY_NAME))
    assert [r["image"] for r in summary] == sorted(map(str, [*images, tmp_path / "photos" / "broken.jpg"]))
    assert [r for r in summary if "error" in r] == [
        {"image": str(tmp_path / "photos" / "broken.jpg"), "error": "broken symbolic link"}
    ]
    assert rank_summaries(out) == []

    straight = tmp_path / "straight"
    assert len(run_job(inputs, straight, world_size=1)) == 12
    assert (out / SUMMARY_NAME).read_bytes() == (straight / SUMMARY_NAME).read_bytes()  # as one uninterrupted run

    (out / summary[3]["files"][1]).unlink()  # an output deleted since: that image is done again, and only it
    (out / summary[5]["files"][0]).write_bytes(b"")  # an empty file counts as missing
    assert sorted(run_job(inputs, out, world_size=3, resume=True)) == sorted([summary[3]["image"], summary[5]["image"]])
    assert [r["image"] for r in read_summary(out / SUMMARY_NAME)] == [r["image"] for r in summary]
    assert run_job(inputs, out, world_size=1, resume=True) == []


def test_a_fresh_run_forgets_the_previous_summaries(tmp_path):
    make_images(tmp_path / "photos", ["a.jpg", "b.jpg"])
    inputs, out = [str(tmp_path / "photos")], tmp_path / "out"
    assert len(run_job(inputs, out, world_size=2)) == 2
    SummaryLog(rank_summary_path(out, 5)).close()  # a leftover of a bigger job
    assert len(run_job(inputs, out, world_size=1)) == 2  # no --resume: everything is done again
    assert len(list(read_summary(out / SUMMARY_NAME))) == 2 and rank_summaries(out) == []


def test_completed_images_hold_only_the_ranks_own_keys():
    keys = [f"img{i}.jpg" for i in range(50)]
    completed = CompletedImages(np.array([folders.stable_hash(k) for k in keys[:30]], dtype=np.uint64))
    assert [k in completed for k in keys] == [True] * 30 + [False] * 20
    assert len(completed) == 30 and InputEntry("img3.jpg").path == Path("img3.jpg")


# ------------------------------------------------------------------------------------------------- memory

MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from clipseg.folders import CompletedImages, SummaryLog, iter_inputs, merge_summaries, rank_summary_path

    def peak_kib():  # this process's peak RSS (getrusage's ru_maxrss would include the parent's from before exec)
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))

    folder, out = sys.argv[1], Path(sys.argv[2])
    start, count = peak_kib(), 0
    with SummaryLog(rank_summary_path(out, 0)) as log:
        for entry in iter_inputs([folder]):
            log.write({"image": entry.key, "prompts": [{"prompt": "a cat", "area_fraction": 0.25}]})
            count += 1
    walked = peak_kib() - start
    merged = merge_summaries(out, run_bytes=1 << 20)
    after_merge = peak_kib() - start
    completed = CompletedImages.load(out)
    print(json.dumps({"entries": count, "images": merged.images, "completed": len(completed),
                      "walk_kib": walked, "merge_kib": after_merge, "resume_kib": peak_kib() - start}))
    """
)


def memory_of_a_walk(tmp_path: Path, n_entries: int) -> dict:
    folder, out = tmp_path / f"folder{n_entries}", tmp_path / f"out{n_entries}"
    folder.mkdir()
    out.mkdir()
    for i in range(n_entries):
        os.close(os.open(folder / f"img{i:06d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout)
    assert measured["entries"] == measured["images"] == measured["completed"] == n_entries
    return measured


def test_memory_stays_flat_on_a_folder_of_100000_entries(tmp_path):
    small, large = memory_of_a_walk(tmp_path, 1_000), memory_of_a_walk(tmp_path, 100_000)
    growth = {key: large[key] - small[key] for key in ("walk_kib", "merge_kib", "resume_kib")}
    # Measured on 100,000 entries against 1,000: walking and writing a summary line per image 0 MiB (a sorted list of
    # the paths takes 26 MiB, of the names 7 MiB); merging with 1 MiB runs 3.2 MiB (all lines at once: about 25 MiB);
    # loading the completed images for a resume 2.5 MiB more (8 bytes an image kept, the rest while sorting them).
    assert growth["walk_kib"] < 1024, growth
    assert growth["merge_kib"] < 5 * 1024, growth
    assert growth["resume_kib"] - growth["merge_kib"] < 32 * (100_000 - 1_000) / 1024, growth
