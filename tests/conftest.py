"""Shared fixtures: a small synthetic PhraseCut generated once per test session.

32 images, seed 0: 61 train, 16 val, 10 test and 5 miniv tasks (score tests need at least 6 test tasks).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYNTHETIC_IMAGES = 32
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root of a 32-image synthetic PhraseCut (pass it to `dataset.PhraseCut`; the data is at
    <root>/data/VGPhraseCut_v0). Shared by the whole session: tests that damage data must copy it first."""
    import synthetic

    root = tmp_path_factory.mktemp("synthetic_phrasecut")
    synthetic.make_synthetic_phrasecut(root, n_images=SYNTHETIC_IMAGES, seed=SYNTHETIC_SEED)
    return root
