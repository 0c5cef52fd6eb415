"""bench.py: an --out that cannot be written (or names a file, not a folder) is refused before anything is measured;
the precision rows end with whether predict.py's default is this machine's fastest path that keeps fp32's masks."""

import json

import pytest
import torch
from conftest import AMX_XEON, VNNI_EPYC, simulate_cpu

import bench
from clipseg.speed.models import default_check, describe_default_check, path_functions


def test_an_unwritable_out_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *args: pytest.fail("measured although --out cannot be written"))
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "a_file is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "bench_results.json")])  # the older form: a file
    assert exit_info.value.code == 2 and "argument --out: must name a folder" in capsys.readouterr().err


def rows(fp32: float, bf16: float, int8: float, int8_agreement: float = 0.997, openvino: float | None = None) -> dict:
    """Batch-1 rows of clipseg.speed.models.time_precision_paths: seconds, mask agreement with our fp32 on the noise
    inputs and on the scenes."""
    rows = {
        "hf_fp32": {"seconds": 0.496, "mask_agreement": 0.999, "scene_agreement": 0.999},
        "ours_fp32": {"seconds": fp32, "mask_agreement": 1.0, "scene_agreement": 1.0},
        "ours_bf16": {"seconds": bf16, "mask_agreement": 0.9962, "scene_agreement": 0.997},
        "ours_int8": {"seconds": int8, "mask_agreement": int8_agreement, "scene_agreement": 0.997},
        "onnx_fp32": {"seconds": 0.001, "mask_agreement": 1.0, "scene_agreement": 1.0},  # needs its own export step
    }
    if openvino is not None:
        rows["openvino_int8"] = {"seconds": openvino, "mask_agreement": 0.996, "scene_agreement": 0.9955}
    return rows


def test_the_default_check_says_whether_the_rule_picked_the_fastest_path_that_keeps_the_masks(monkeypatch):
    simulate_cpu(monkeypatch, AMX_XEON)
    check = default_check(rows(0.41, 0.181, 0.274), ("torch", "bf16"))  # an AMX Xeon's batch-1 timings (README)
    assert (check["cpu_class"], check["fastest"], check["default_is_fastest"]) == ("amx", "torch bf16", True)
    assert describe_default_check(check).endswith("torch bf16 (the default is this machine's fastest)")
    check = default_check(rows(0.41, 0.181, 0.274, openvino=0.12), ("openvino", "int8"))  # OpenVINO counts
    assert (check["fastest"], check["default_is_fastest"]) == ("openvino int8", True)
    simulate_cpu(monkeypatch, VNNI_EPYC)
    check = default_check(rows(0.41, 0.181, 0.274), ("torch", "int8"))  # a CPU where the rule would be wrong
    assert (check["cpu_class"], check["fastest"], check["default_is_fastest"]) == ("vnni", "torch bf16", False)
    assert "181 ms against the default's 274 ms): the rule in clipseg/precision.py does not fit" in (
        describe_default_check(check)
    )
    check = default_check(rows(0.41, 0.5, 0.2, int8_agreement=0.994), ("torch", "int8"))  # fastest, below the bar
    assert check["fastest"] == "torch fp32" and "torch int8" not in check["seconds"]
    assert "against the default's below the bar or not measured" in describe_default_check(check)
    scenes_below = rows(0.41, 0.181, 0.274)
    scenes_below["ours_bf16"]["scene_agreement"] = 0.99  # the noise agrees, the real-looking images do not
    assert default_check(scenes_below, ("torch", "bf16"))["fastest"] == "torch int8"


def test_the_shape_generic_openvino_row_is_reported_but_is_no_default(monkeypatch):
    simulate_cpu(monkeypatch, AMX_XEON)
    timed = rows(0.41, 0.181, 0.274, openvino=0.115)
    timed["openvino_int8_generic"] = {"seconds": 0.11, "mask_agreement": 0.996, "scene_agreement": 0.996}
    check = default_check(timed, ("openvino", "int8"))
    assert (check["fastest"], check["default_is_fastest"]) == ("openvino int8", True)
    assert check["seconds"]["openvino int8"] == 0.115 and len(check["seconds"]) == 4  # torch x3, openvino int8


def test_exported_paths_encode_the_image_and_the_text_in_each_call():
    class Runner:  # OpenVinoCLIPSeg's interface, recording what it is asked
        def __init__(self):
            self.calls = []

        def encode_image(self, pixels):
            self.calls.append(("image", tuple(pixels.shape)))
            return pixels

        def embed_text(self, phrases):
            self.calls.append(("text", len(phrases)))
            return len(phrases)

        def decode(self, features, conditional):
            return torch.zeros(conditional, 1, *features.shape[2:])

    runner = Runner()
    paths = path_functions(None, {}, {"openvino_int8": runner})
    logits = paths["openvino_int8"](torch.zeros(2, 3, 32, 48), ["a", "b"])
    paths["openvino_int8"](torch.zeros(2, 3, 32, 48), ["a", "b"])
    assert logits.shape == (2, 1, 32, 48)
    assert runner.calls == [("image", (2, 3, 32, 48)), ("text", 2)] * 2


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Runs bench.main with every measurement replaced by a recorder: returns a function of argv -> the names of
    the measurements called, in order."""
    calls = []

    def recorder(name, value):
        def record(*args, **kwargs):
            calls.append(name)
            return value

        return record

    forward_rows = [{"ours_gflops": 1.0}]
    for name, value in (
        ("parameter_counts", []),
        ("scale_out_rows", []),
        ("refined_head_comparison", {}),
        ("build_models", (None, None)),
        ("run_comparisons", {}),
        ("matmul_rates", {"fp32": 1.0}),
        ("forward_flops", 1.0),
        ("precision_paths", {}),
        ("forward_comparison", forward_rows),
        ("bf16_comparison", {}),
        ("training_comparison", {}),
        ("data_pipeline_rate", {}),
        ("index_rate", {}),
    ):
        monkeypatch.setattr(bench, name, recorder(name, value))

    def run(*flags: str) -> list[str]:
        calls.clear()
        bench.main([*flags, "--out", str(tmp_path)])
        return list(calls)

    return run


MODEL_ROWS = ["build_models", "run_comparisons", "matmul_rates", "forward_flops", "precision_paths"]
FORWARD_ROWS = ["forward_comparison", "bf16_comparison"]


def test_rows_picks_the_groups_measured_in_a_fixed_order(measured):
    everything = ["refined_head_comparison", *MODEL_ROWS, *FORWARD_ROWS, "training_comparison", "data_pipeline_rate"]
    assert measured() == everything
    assert measured("--rows", "params") == ["parameter_counts"]
    assert measured("--rows", "scale-out") == ["scale_out_rows"]
    assert measured("--rows", "train,head") == [
        "refined_head_comparison",
        "build_models",
        "matmul_rates",
        "forward_flops",
        "training_comparison",
    ]
    assert measured("--rows", "runs") == ["build_models", "run_comparisons"]  # no matmul rates: nothing uses them
    assert measured("--rows", "data", "--index-tasks", "10") == ["data_pipeline_rate", "index_rate"]


def test_the_older_only_and_skip_flags_still_pick_the_same_rows(measured):
    assert measured("--only-precision") == measured("--rows", "precision")
    assert measured("--only-runs") == ["build_models", "run_comparisons"]
    assert measured("--only-head") == ["refined_head_comparison"]
    assert measured("--only-params") == ["parameter_counts"]
    assert measured("--only-data", "--index-tasks", "10") == ["data_pipeline_rate", "index_rate"]
    assert measured("--skip-precision", "--skip-runs", "--skip-data") == measured("--rows", "head,forward,train")
    assert measured("--skip-train") == measured("--rows", "head,runs,precision,forward,data")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rows", "precision,speed"], "argument --rows: speed: choose from params, scale-out, head"),
        (["--rows", ","], "argument --rows: no group"),
        (["--rows", "runs", "--only-data"], "give the rows either with --rows or with --only-data, not both"),
        (["--only-runs", "--skip-runs"], "--only-runs --skip-runs leave no row to measure"),
        (["--rows", "head", "--index-tasks", "5"], "--index-tasks measures with the data rows: add data to --rows"),
        (["--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
        (["--threads", "-2"], "argument --threads: must be a positive integer, got -2"),
        (["--threads", "100000"], "argument --threads: must be at most 1024, got 100000"),
        (["--rows", "scale-out", "--scale-out-backbone", "./nowhere"], "--scale-out-backbone: invalid choice"),
        (["--image-size", "360"], "image size 360 is not a multiple of the patch size 16 of ViT-B/16: use 352 or 368"),
        (["--image-size", "7"], "image size 7 is not a multiple of the patch size 16 of ViT-B/16: use 16\n"),
    ],
)
def test_bad_flags_are_usage_errors_before_measuring(flags, message, measured, capsys):
    with pytest.raises(SystemExit) as exit_info:
        measured(*flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_row_that_fails_keeps_the_rows_measured_before_it(measured, monkeypatch, tmp_path, capsys):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room for the batch")

    monkeypatch.setattr(bench, "training_comparison", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        measured()
    assert exit_info.value.code == 1
    assert "error: a row failed (MemoryError: no room for the batch)" in capsys.readouterr().err
    results = json.loads((tmp_path / "bench_results.json").read_text())
    assert results["failed"] == "MemoryError: no room for the batch" and "precision_paths" in results
