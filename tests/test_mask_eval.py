"""clipseg/mask_eval.py: the boundary F-score the mask measurements use."""

import numpy as np
import pytest

from clipseg.mask_eval import boundary_f_score


def test_boundary_f_score_matches_boundaries_within_the_tolerance():
    truth = np.zeros((60, 60), dtype=bool)
    truth[20:40, 20:40] = True
    assert boundary_f_score(truth, truth) == 1.0
    assert boundary_f_score(np.roll(truth, 2, axis=1), truth) == 1.0  # every edge pixel within 2 px
    # shifted 5 px: of each square's 76 edge pixels, 17 on the top row, 17 on the bottom and 4 of one side's ends
    # lie within 2 px of the other's: precision = recall = 38 / 76
    assert boundary_f_score(np.roll(truth, 5, axis=1), truth) == pytest.approx(0.5)
    assert boundary_f_score(np.zeros_like(truth), truth) == 0.0
    assert boundary_f_score(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
