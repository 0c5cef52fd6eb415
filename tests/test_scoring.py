"""clipseg/scoring.py: shuffled prompts are a seeded derangement; the printed table shows the values in percent and
marks interrupted and shuffled runs. Scoring end to end against a recomputation: tests/test_score.py."""

import pytest

from clipseg.scoring import ScoreError, format_table, shuffled_phrases


def test_shuffled_phrases_is_a_seeded_derangement():
    pairs = [(f"t{i}", f"phrase {i}") for i in range(50)]
    mapping = shuffled_phrases(pairs)
    assert sorted(mapping) == sorted(t for t, _ in pairs)
    assert sorted(mapping.values()) == sorted(p for _, p in pairs)
    assert all(mapping[task] != phrase for task, phrase in pairs)
    assert mapping == shuffled_phrases(pairs) and mapping != shuffled_phrases(pairs, seed=1)
    with pytest.raises(ScoreError, match="at least 2"):
        shuffled_phrases(pairs[:1])


def test_table_marks_interrupted_and_shuffled_runs():
    results = {
        "model": "m", "data": "synthetic", "split": "test", "n_samples": 3, "threshold": 0.3,
        "skipped": {"count": 2}, "excluded": {"count": 1}, "shuffle_prompts": True, "interrupted": True,
        "paper": {"miou": 0.5, "iou_fg": 0.25, "ap": 0.125, "iou_bin": 0.75}, "phrasecut": {},
    }  # fmt: skip
    table = format_table(results)
    assert "| t = 0.30 | 50.0 | 25.0 | 12.5 | 75.0 |" in table
    assert "2 skipped, 1 excluded" in table and "shuffled prompts" in table and "INTERRUPTED" in table
