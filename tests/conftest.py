"""Shared fixtures: a small synthetic PhraseCut generated once per test session, a tiny saved CLIPSeg, and the
path of Debian's chromium for browser tests (`require` skips a test whose system package is missing, failing
instead under CI=true).

32 images, seed 0: 61 train, 16 val, 10 test and 5 miniv tasks (score tests need at least 6 test tasks).
"""

import os
import shutil
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


def require(package: str, install: str) -> None:
    """Skip a test that needs a missing `package`, naming it and how to install it; under CI (CI=true) fail
    instead, so that CI never passes by skipping."""
    message = f"{package} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run this test", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPSeg (image size 64) saved with `save_pretrained`, to load as a hub id would be. Its output
    head is scaled up so that probabilities spread over about 0.1 to 0.9."""
    import torch

    from model import CLIPSeg

    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", image_size=64)
    with torch.no_grad():
        for param in model.decoder.transposed_convolution.parameters():
            param.mul_(4.0)
    return model.save_pretrained(tmp_path_factory.mktemp("tiny_clipseg"))


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's `chromium` browser (for browser tests); skips locally, fails in CI, when missing."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if path is None:
        require("chromium", "apt-get install chromium")
    return path
