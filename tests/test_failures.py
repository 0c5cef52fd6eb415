"""clipseg/failures.py: hostile phrases and task ids stay inside the output folder and are escaped in the gallery;
`parse_gallery` checks that an index.html is well formed (also for tests/test_failure_test.py)."""

from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from clipseg.failures import FailureCase, render_panel, write_index
from clipseg.outputs import safe_name


class GalleryParser(HTMLParser):
    """Collects <img src> and the text of each table row of index.html."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.open_tags = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows.append([])
        if tag not in ("img", "meta"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> does not close <{self.open_tags[-1:]}>"
        self.open_tags.pop()

    def handle_data(self, data):
        if self.rows and data.strip():
            self.rows[-1].append(data.strip())


def parse_gallery(path: Path) -> GalleryParser:
    parser = GalleryParser()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser.feed(text)
    parser.close()
    assert parser.open_tags == []
    return parser


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
