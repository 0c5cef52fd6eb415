"""clipseg/runs.py: log.jsonl read back whatever a hand edit or a kill left in it, and loss.png drawn from the lines
that hold numbers."""

import json

from PIL import Image

from clipseg.runs import RunFiles, plot_log, read_log


def write_log(files: RunFiles, lines: list[str]) -> None:
    files.dir.mkdir(parents=True, exist_ok=True)
    files.log.write_text("".join(line + "\n" for line in lines))


def test_read_log_keeps_the_objects_up_to_the_step_asked(tmp_path):
    files = RunFiles(tmp_path / "run")
    records = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
    write_log(files, [*map(json.dumps, records), "5", "[1, 2]", '{"step": "x"}', '{"step": 4, "lo'])
    assert read_log(files.log) == records
    assert read_log(files.log, up_to_step=2) == records[:2]
    assert read_log(tmp_path / "missing.jsonl") == []


def test_loss_png_is_drawn_from_the_lines_that_hold_numbers(tmp_path):
    files = RunFiles(tmp_path / "run")
    train = [{"step": step, "loss": 1 / step, "lr": 1e-3} for step in range(1, 9)]
    scores = {"val_miou": 0.4, "val_iou_fg": 0.3, "val_ap": 0.5, "best": True}
    lines = [*map(json.dumps, train), json.dumps({"step": 9, "loss": None, "lr": 1e-3})]
    lines += [json.dumps({"step": 8, "val_loss": 0.6, **scores}), json.dumps({"step": 9, "val_loss": None, **scores})]
    write_log(files, lines)
    plot_log(files, "run")
    with Image.open(files.plot) as picture:
        assert picture.format == "PNG" and picture.size[1] > 500  # the validation panel below the loss
