"""clipseg.prediction_outputs: prompt slugs stay safe and distinct, repeated prompts merge."""

from clipseg.outputs import is_safe_name
from clipseg.prediction_outputs import build_prompts, merge_duplicates


def test_ten_thousand_distinct_prompts_keep_distinct_safe_files():
    phrases = [f"thing {i}" for i in range(10_000)] + ["../../x", "thing 7"]
    prompts, merged = merge_duplicates(build_prompts(phrases, []))
    assert [p.text for p in prompts] == phrases[:-1] and merged == [{"prompt": "thing 7", "times": 2}]
    assert len({p.slug for p in prompts}) == len(prompts) and all(is_safe_name(p.slug) for p in prompts)
