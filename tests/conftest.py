"""Shared fixtures: small synthetic PhraseCut, VOC and COCO-20i data, a tiny model and a tiny validated training run,
made once per session, and the path of Debian's chromium for browser tests (`require` skips a test whose system
package is missing, failing instead under CI=true). Shared helpers (imported `from conftest import ...`): the images,
masks and hostile names that the predictor, predict.py, the segmenter and app.py tests feed in; the CPUs of the
precision rule, simulated (`simulate_cpu`); a free local port, commands run as one process or under torchrun
(`run_command`; score.py with its results JSON and PNGs read back: `score_outputs`) and output folders read back
(`folder_files`).

32 images, seed 0: 61 train, 16 val, 10 test and 5 miniv tasks (score tests need at least 6 test tasks).
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import shutil
import socket
import struct
import tempfile
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from model import CLIPSeg

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# predict.py's and app.py's --backend defaults to auto, which on some CPUs converts the model to OpenVINO: the tests
# pin PyTorch (a test of auto removes this) and keep any conversion out of the user's cache.
os.environ["CLIPSEG_BACKEND"] = "torch"
os.environ["CLIPSEG_CACHE"] = tempfile.mkdtemp(prefix="clipseg-test-cache-")
atexit.register(shutil.rmtree, os.environ["CLIPSEG_CACHE"], ignore_errors=True)

SYNTHETIC_IMAGES = 32
SYNTHETIC_SEED = 0
NASTY_PROMPTS = ["../../etc/passwd", "/", "..", "a\x00b", "x" * 500, "猫 on the mat", "CON", "a/b\\c:d*e?"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root of a 32-image synthetic PhraseCut (pass it to `dataset.PhraseCut`; the data is at
    <root>/data/VGPhraseCut_v0). Shared by the whole session: tests that damage data must copy it first."""
    from clipseg import synthetic

    root = tmp_path_factory.mktemp("synthetic_phrasecut")
    synthetic.make_synthetic_phrasecut(root, n_images=SYNTHETIC_IMAGES, seed=SYNTHETIC_SEED)
    return root


@pytest.fixture
def damaged_root(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic data (without its index) that a test may break."""
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy, ignore=shutil.ignore_patterns(".clipseg_index"))
    return copy


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """Root of a 40-image synthetic Pascal VOC 2012 (VOC2012/, lists/, splits/; 30 val images). Shared: copy it
    before damaging it."""
    from clipseg import synthetic

    root = tmp_path_factory.mktemp("synthetic_voc")
    synthetic.make_synthetic_voc(root, n_images=40, seed=SYNTHETIC_SEED)
    return root


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    """Root of a 54-image synthetic COCO-20i val set (HSNet's layout and COCO's instances JSON). Shared."""
    from clipseg import synthetic

    root = tmp_path_factory.mktemp("synthetic_coco")
    synthetic.make_synthetic_coco(root, n_images=54, seed=SYNTHETIC_SEED)
    return root


@pytest.fixture(scope="session")
def validated(tmp_path_factory, synthetic_root):
    """A tiny 12-iteration train.py run validating every 4 iterations, keeping iteration 8: (run folder, summary,
    argv). Read, never changed, by test_train.py's validation tests and test_train_resume.py's kill test: made once
    per session."""
    from helpers import VALIDATE, flags, run

    tmp_path = tmp_path_factory.mktemp("validated")
    argv = flags(tmp_path, synthetic_root, "--name=val", "--max-iterations=12", "--ckpt=4", "--lr=3e-3", *VALIDATE)
    summary = run([*argv, "--keep-checkpoints=8"])
    return tmp_path / "ck" / "val", summary, argv


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A factory: `tiny_checkpoint(name="tiny", seed=0, **knobs)` saves a tiny random CLIPSeg (knobs go to
    `CLIPSeg.from_backbone("tiny", ...)`) whose head is scaled x4 so that its probabilities spread over (0, 1),
    as `<a fresh directory>/<name>`, and returns that path."""
    import torch

    from model import CLIPSeg

    def make(name: str = "tiny", seed: int = 0, **knobs) -> Path:
        torch.manual_seed(seed)
        model = CLIPSeg.from_backbone("tiny", **knobs)
        with torch.no_grad():
            for param in model.decoder.transposed_convolution.parameters():
                param.mul_(4.0)
        return model.save_pretrained(tmp_path_factory.mktemp("checkpoints") / name)

    return make


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint):
    """A tiny random CLIPSeg saved as a hub checkpoint (`tiny_checkpoint()`); a module may define its own."""
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def model(tiny_dir):
    """`tiny_dir` loaded back as a hub id would be, in eval mode; a module may define its own."""
    from model import CLIPSeg

    return CLIPSeg.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def overflowing_checkpoint(tmp_path_factory) -> Path:
    """A tiny model at 64 px whose head weights are finite but huge (3e38): its logits overflow to NaN and
    infinity, as a diverged run's would (the weights themselves pass every load check)."""
    import torch

    from model import CLIPSeg

    torch.manual_seed(0)
    model = CLIPSeg.from_backbone("tiny", image_size=64)
    with torch.no_grad():
        for param in model.decoder.transposed_convolution.parameters():
            param.fill_(3e38)
    return model.save_pretrained(tmp_path_factory.mktemp("checkpoints") / "overflowing")


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_checkpoint) -> Path:
    """A checkpoints directory holding `demo`: a tiny model at 64 px (see `tiny_checkpoint`)."""
    return tiny_checkpoint("demo", image_size=64).parent


@pytest.fixture(scope="module")
def demo_model(tiny_checkpoints):
    """`tiny_checkpoints`' demo (image size 64), loaded as a hub id would be, in eval mode (the app's and the
    Segmenter's tests)."""
    from model import CLIPSeg

    return CLIPSeg.from_pretrained(tiny_checkpoints / "demo").eval()


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """A factory: `tiny_sam(name="sam", seed=0, broken=None)` saves a tiny random transformers `SamModel` (input
    side 64, patch 16: a 4 x 4 image embedding and a 16 x 16 mask prompt) and its `SamProcessor` to
    `<a fresh directory>/<name>` and returns that path. broken="nan" puts a NaN in one weight."""
    import torch
    import transformers

    def make(name: str = "sam", seed: int = 0, broken: str | None = None) -> Path:
        config = transformers.SamConfig(
            vision_config=dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                output_channels=32, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16,
            ),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8),
            mask_decoder_config=dict(
                hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
            ),
        )  # fmt: skip
        torch.manual_seed(seed)
        model = transformers.SamModel(config)
        if broken == "nan":
            with torch.no_grad():
                model.mask_decoder.iou_token.weight[0, 0] = float("nan")
        image_processor = transformers.SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
        path = tmp_path_factory.mktemp("sam") / name
        model.save_pretrained(path)
        transformers.SamProcessor(image_processor).save_pretrained(path)
        return path

    return make


def require(package: str, install: str) -> None:
    """Skip a test that needs a missing `package`, naming it and how to install it; under CI (CI=true) fail
    instead, so that CI never passes by skipping."""
    message = f"{package} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run this test", pytrace=False)
    pytest.skip(message)


def require_modules(names: tuple[str, ...], requirements: str) -> None:
    """At the top of a test module: skip the whole module, naming the missing Python package and the requirements
    file that installs it; under CI (CI set) raise the ImportError instead, so that CI never passes by skipping."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{name} is not installed: pip install -r {requirements}", allow_module_level=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test server or a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(script: str, argv, cwd: Path, nproc: int | None = None, timeout: float = 600):
    """`python SCRIPT ARGV` in a fresh process, or with `nproc` processes under torchrun (gloo, rendezvous on
    127.0.0.1 at a free port); one CPU thread per process, so that sums run in one order however many run."""
    import subprocess
    import sys

    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}"]
        launcher += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    command = [*launcher, str(repo / script), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def score_outputs(argv, out: Path, nproc: int | None = None) -> tuple[dict, dict[str, bytes], str]:
    """`score.py ARGV --out OUT/scores --save-predictions OUT/png` as one process or `nproc` under torchrun
    (`run_command`, in OUT's parent), which must succeed: (its results JSON without the time taken, every file under
    OUT/png as `folder_files` reads them, stdout)."""
    argv = [*argv, "--out", out / "scores", "--save-predictions", out / "png"]
    done = run_command("score.py", argv, out.parent, nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = (out / "scores").glob("*.json")  # the one results file in the --out folder
    results = json.loads(written.read_text())
    del results["seconds"]
    return results, folder_files(out / "png"), done.stdout


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`: its path relative to `folder` -> its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's `chromium` browser (for browser tests); skips locally, fails in CI, when missing."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if path is None:
        require("chromium", "apt-get install chromium")
    return path


# ------------------------------------------------------------------------------------------ images to feed in


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Uniform noise, `width` x `height`, in mode RGB, RGBA or L."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def write_support(tmp_path: Path) -> tuple[Path, Path]:
    """An 80x60 support image and its 0/255 mask (a 30x30 box), as support.png and support_mask.png in `tmp_path`."""
    support, mask = tmp_path / "support.png", tmp_path / "support_mask.png"
    random_image(80, 60, seed=7).save(support)
    mask_array = np.zeros((60, 80), dtype=np.uint8)
    mask_array[10:40, 20:50] = 255
    Image.fromarray(mask_array).save(mask)
    return support, mask


# --------------------------------------------------------------------------------------------- simulated CPUs

# torch.cpu.get_capabilities() of the CPU classes of clipseg.precision's rule: (capabilities, class, predict's default)
AMX_XEON = {"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx_vnni": True, "avx512_bf16": True,
            "amx_tile": True, "amx_bf16": True, "amx_int8": True}  # fmt: skip
VNNI_EPYC = {"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True}
AVX_VNNI_CORE = {"avx2": True, "avx_vnni": True}  # a client CPU with AVX-VNNI and no AVX-512
AVX2_EPYC = {"avx2": True, "fma3": True}
CPU_CLASSES = [(AMX_XEON, "amx", "bf16"), (VNNI_EPYC, "vnni", "int8"), (AVX_VNNI_CORE, "vnni", "int8"),
               (AVX2_EPYC, "other", "fp32")]  # fmt: skip


def simulate_cpu(monkeypatch, capabilities: dict) -> None:
    """Make clipseg.precision see a CPU with these torch capabilities, with native bf16 where it has AVX512-BF16 or
    AMX (torch then runs bf16 emulated on a CPU without it: slower, same results)."""
    from clipseg import precision

    monkeypatch.setattr(precision, "cpu_capabilities", lambda: capabilities)
    native = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)


# ---------------------------------------------------------------------------------- the app's images and zips


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy background with a red disc on the left and a blue square on the right."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    disc = (xs - width * 0.3) ** 2 + (ys - height * 0.5) ** 2 < (min(width, height) * 0.2) ** 2
    pixels[disc] = (220, 30, 30)
    pixels[int(height * 0.3) : int(height * 0.7), int(width * 0.6) : int(width * 0.85)] = (30, 60, 220)
    return Image.fromarray(pixels)


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A 0/255 mask, white inside `box` = (left, top, right, bottom)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def huge_png(path: Path, width: int = 9000, height: int = 9000) -> Path:
    """A PNG whose header claims `width` x `height` (its pixel data is a stub): rejected from its header alone."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def read_zip(path: str | Path) -> tuple[dict[str, Image.Image], dict]:
    """A masks zip -> ({name: mask image}, summary)."""
    with zipfile.ZipFile(path) as archive:
        masks = {n: Image.open(io.BytesIO(archive.read(n))) for n in archive.namelist() if n.endswith(".png")}
        return masks, json.loads(archive.read("summary.json"))


@contextmanager
def vision_tower_calls(model: CLIPSeg):
    """Counts passes through CLIP's vision tower (each runs its pre-layer-norm once, in every precision): yields a
    Counter."""
    counts = Counter()
    handle = model.clip.vision_model.pre_layrnorm.register_forward_hook(lambda *_: counts.update(["vision"]))
    decoder = model.decoder.register_forward_hook(lambda *_: counts.update(["decoder"]))
    try:
        yield counts
    finally:
        handle.remove()
        decoder.remove()


def write_inputs(tmp_path: Path) -> tuple[Path, str]:
    """A folder of two images of different shapes, and a support image with its mask."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, (width, height) in {"wide.png": (90, 60), "tall.png": (50, 100)}.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    support, mask = tmp_path / "support.png", tmp_path / "support_mask.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(support)
    mask_array = np.zeros((40, 40), dtype=np.uint8)
    mask_array[10:30, 5:25] = 255
    Image.fromarray(mask_array).save(mask)
    return folder, f"{support}:{mask}"


def strict_json(text: str) -> dict:
    """`text` parsed by a strict JSON parser (NaN and Infinity are not JSON)."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)
