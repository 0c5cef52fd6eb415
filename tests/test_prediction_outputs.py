"""clipseg.prediction_outputs: output folder names and prompt slugs stay safe and distinct, repeated prompts merge."""

from pathlib import Path

from conftest import NASTY_PROMPTS

from clipseg.outputs import is_safe_name
from clipseg.prediction_outputs import build_prompts, image_output_names, merge_duplicates


def test_output_names_are_safe_and_distinct():
    names = [name for name in image_output_names([Path(f"{p}.jpg") for p in NASTY_PROMPTS])]
    assert len(set(names)) == len(names) and all("/" not in name and name not in (".", "..") for name in names)
    assert image_output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])[2] == "y"
    first, second, _ = image_output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])
    assert first != second and first.startswith("a-x-jpg~") and second.startswith("b-x-jpg~")


def test_ten_thousand_distinct_prompts_keep_distinct_safe_files():
    phrases = [f"thing {i}" for i in range(10_000)] + ["../../x", "thing 7"]
    prompts, merged = merge_duplicates(build_prompts(phrases, []))
    assert [p.text for p in prompts] == phrases[:-1] and merged == [{"prompt": "thing 7", "times": 2}]
    assert len({p.slug for p in prompts}) == len(prompts) and all(is_safe_name(p.slug) for p in prompts)
