"""clipseg/failures.py: hostile phrases and task ids stay inside the output folder and are escaped in the gallery;
`parse_gallery` checks that an index.html is well formed (also for tests/test_failure_test.py)."""

import numpy as np
from helpers import parse_gallery

from clipseg.failures import FailureCase, render_panel, write_index
from clipseg.outputs import safe_name


def test_hostile_phrases_and_task_ids_stay_inside_and_are_escaped(tmp_path):
    case = FailureCase(
        task_id="../../etc/<passwd>",
        phrase='the $x^2$ "cat" <script>alert(1)</script> & co\x00\n',
        phrase_type="attribute",
        n_instances=1,
        ious=(0.0, 0.1, 0.2, 0.3, 0.4),
        panel=f"{safe_name('../../etc/<passwd>')}.png",
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    gt = np.zeros((90, 120), dtype=bool)
    gt[20:50, 30:80] = True
    render_panel(image, gt, rng.random((90, 120)).astype(np.float32), case, tmp_path / case.panel)
    assert [p.name for p in tmp_path.iterdir()] == [case.panel]
    write_index([case], tmp_path / "index.html", "Failure cases: <model>", "1 of 1")
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    gallery = parse_gallery(tmp_path / "index.html")
    assert gallery.images == [case.panel]
