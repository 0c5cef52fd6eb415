"""metrics.py against brute-force numpy, hand-computed cases, invariants and bounded memory; the benchmarks'
EpisodeMetrics and ZeroShotMetrics against pixel-by-pixel recomputations."""

import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.integrate import simpson

from clipseg.metrics import (
    PAPER_THRESHOLDS,
    EpisodeMetrics,
    PaperMetrics,
    PhraseCutMetrics,
    ZeroShotMetrics,
    average_precision,
    binary_iou,
    confusion_counts,
    ious_at_thresholds,
    phrasecut_subsets,
    sum_states,
)

AT_03 = 14  # index of t = 0.3 in PAPER_THRESHOLDS


def brute_counts(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn, tn (N, 49) by one comparison per threshold; probs, targets (N, H, W)."""
    truth = targets.astype(bool)
    counts = []
    for threshold in (0.02 * k for k in range(1, 50)):
        positive = probs.astype(np.float64) > round(threshold, 2)
        counts.append([(positive & truth).sum((1, 2)), (positive & ~truth).sum((1, 2)),
                       (~positive & truth).sum((1, 2)), (~positive & ~truth).sum((1, 2))])  # fmt: skip
    return tuple(np.array(c).T for c in zip(*counts))


def brute_paper(probs: np.ndarray, targets: np.ndarray) -> dict:
    """The paper's recipe, spelled out per threshold with Python sets (docs/original.md §8.1)."""
    tp, fp, fn, tn = brute_counts(probs, targets)
    miou = (tp / (1 + tp + fp + fn)).mean(0)
    tp, fp, fn, tn = (c.sum(0) for c in (tp, fp, fn, tn))
    iou_fg, iou_bg = tp / (1 + tp + fp + fn), tn / (1 + tn + fp + fn)
    pairs = sorted({(tp[j] / (1 + tp[j] + fn[j]), tp[j] / (1 + tp[j] + fp[j])) for j in range(49) if tp[j] + fp[j]})
    ap = simpson([p for _, p in pairs], x=[r for r, _ in pairs]) if len(pairs) > 1 else 0.0
    return {"miou": miou, "iou_fg": iou_fg, "iou_bin": (iou_fg + iou_bg) / 2, "ap": ap}


def random_batch(seed: int, shape=(5, 19, 23), positive_rate=0.3, signal=0.4):
    """Probabilities that partly follow the targets, so that every threshold matters."""
    rng = np.random.default_rng(seed)
    targets = rng.random(shape) < positive_rate
    probs = np.clip((1 - signal) * rng.random(shape) + signal * targets + rng.normal(0, 0.05, shape), 0, 1)
    return probs, targets


# ---------------------------------------------------------------------------------------------------- counts


def test_thresholds_are_the_papers_49():
    assert len(PAPER_THRESHOLDS) == 49
    np.testing.assert_allclose(PAPER_THRESHOLDS, np.linspace(0, 1, 51)[1:-1], atol=1e-12)
    assert PAPER_THRESHOLDS[AT_03] == 0.3


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("target_dtype", ["bool", "float32", "uint8"])
@pytest.mark.parametrize("channel", [False, True])
def test_counts_equal_brute_force_at_every_threshold(framework, dtype, target_dtype, channel):
    probs, targets = random_batch(0)
    probs, targets = probs.astype(dtype), targets.astype(target_dtype)
    expected = brute_counts(probs, targets)
    if channel:
        probs = probs[:, None]
    if framework == "torch":
        probs, targets = torch.from_numpy(probs), torch.from_numpy(targets)
    for got, want, name in zip(confusion_counts(probs, targets), expected, ("tp", "fp", "fn", "tn")):
        assert got.shape == (5, 49) and got.dtype == np.int64
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_a_pixel_is_positive_only_above_the_threshold():
    """p exactly at t_k is negative at t_k and positive below it; p = 0 is never positive, p = 1 always."""
    probs = np.concatenate([PAPER_THRESHOLDS, [0.0, 1.0]])[None, None, :]
    tp, fp, fn, tn = confusion_counts(probs, np.ones_like(probs, dtype=bool))
    # at threshold j the positives are the thresholds above t_j (48 - j of them) plus p = 1
    np.testing.assert_array_equal(tp[0], 48 - np.arange(49) + 1)
    assert (fp == 0).all() and (tn == 0).all() and (tp + fn == 51).all()


def test_counts_follow_the_given_threshold_order():
    probs, targets = random_batch(1)
    thresholds = [0.5, 0.1, 0.9, 0.3]
    tp, fp, fn, tn = confusion_counts(probs, targets, thresholds)
    for j, threshold in enumerate(thresholds):
        positive = probs > threshold
        np.testing.assert_array_equal(tp[:, j], (positive & targets).sum((1, 2)))
        np.testing.assert_array_equal(fp[:, j], (positive & ~targets).sum((1, 2)))


def test_mismatched_channel_dimensions_are_accepted():
    probs, targets = random_batch(2)
    a = confusion_counts(probs[:, None], targets)
    b = confusion_counts(probs, targets[:, None].astype(np.float32))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("probs", "targets", "message"),
    [
        (np.full((1, 4, 4), 3.0), np.zeros((1, 4, 4)), "apply torch.sigmoid"),
        (np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)), r"probabilities in \[0, 1\]"),
        (np.full((1, 4, 4), -0.1), np.zeros((1, 4, 4)), "apply torch.sigmoid"),
        (np.ones((1, 4, 4), dtype=np.int64), np.zeros((1, 4, 4)), "floating point"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 255, dtype=np.uint8), "png > 127"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.5), "binary mask"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "same shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), r"add the batch dimension"),
        (np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)), r"\(B, 1, H, W\)"),
    ],
)
def test_bad_inputs_raise_a_clear_error(probs, targets, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PaperMetrics().update(probs, targets)


# ---------------------------------------------------------------------------------------------------- paper


def test_paper_metrics_equal_brute_force_and_do_not_depend_on_batching():
    probs, targets = random_batch(3, shape=(11, 21, 17))
    expected = brute_paper(probs, targets)
    metrics = PaperMetrics()
    for start, stop in ((0, 1), (1, 4), (4, 11)):
        metrics.update(torch.from_numpy(probs[start:stop]).float()[:, None], targets[start:stop])
    results, curves = metrics.compute(), metrics.curves()
    float32_expected = brute_paper(probs.astype(np.float32), targets)  # the torch input above is float32
    for name in ("miou", "iou_fg", "iou_bin"):
        np.testing.assert_allclose(curves[name], float32_expected[name], rtol=0, atol=1e-12)
        assert results[name] == pytest.approx(float32_expected[name][AT_03], abs=1e-12)
        best = int(np.argmax(float32_expected[name]))
        assert results[f"{name}_best"] == pytest.approx(float32_expected[name][best], abs=1e-12)
        assert results[f"{name}_best_threshold"] == pytest.approx(0.02 * (best + 1))
    assert results["ap"] == pytest.approx(float32_expected["ap"], abs=1e-12)
    assert results["n_samples"] == 11 and results["threshold"] == 0.3
    whole = PaperMetrics()
    whole.update(probs, targets)
    assert whole.compute()["ap"] == pytest.approx(expected["ap"], abs=1e-12)
    assert whole.compute()["miou"] == pytest.approx(expected["miou"][AT_03], abs=1e-12)


def test_hand_computed_ap_and_iou():
    """Three foreground pixels at p = 0.91, 0.71, 0.51, background at 0: recalls 1/4, 2/4, 3/4 (evenly spaced),
    precisions 1/2, 2/3, 3/4, so Simpson's rule gives (1/4)/3 * (1/2 + 4 * 2/3 + 3/4) = 47/144."""
    probs = np.array([[[0.91, 0.71, 0.51, 0.0, 0.0, 0.0]]])
    targets = np.array([[[1, 1, 1, 0, 0, 0]]], dtype=np.uint8)
    metrics = PaperMetrics()
    metrics.update(probs, targets)
    results = metrics.compute()
    assert results["ap"] == pytest.approx(float(Fraction(47, 144)), abs=1e-12)
    assert results["miou"] == results["iou_fg"] == pytest.approx(3 / 4)  # tp = 3, fp = fn = 0: 3 / (1 + 3)
    assert results["iou_bin"] == pytest.approx((3 / 4 + 3 / 4) / 2)  # tn = 3: 3 / (1 + 3)
    assert results["miou_best"] == pytest.approx(3 / 4) and results["miou_best_threshold"] == 0.02


def test_empty_prediction():
    """Nothing predicted: IoU 0, AP 0 (no threshold has a prediction), background IoU n / (1 + n)."""
    targets = np.zeros((2, 8, 8), dtype=bool)
    targets[:, :2] = True  # 16 foreground and 48 background pixels per sample
    metrics = PaperMetrics()
    metrics.update(np.zeros((2, 8, 8)), targets)
    results = metrics.compute()
    assert results["miou"] == results["iou_fg"] == results["ap"] == results["miou_best"] == 0.0
    assert results["iou_bin"] == pytest.approx((0 + 96 / (1 + 96 + 32)) / 2)


def test_empty_ground_truth_with_empty_prediction_scores_zero_in_miou():
    """+1 smoothing: tp / (1 + tp + fp + fn) = 0 for an empty-vs-empty sample, as in the paper's code."""
    metrics = PaperMetrics()
    metrics.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    results = metrics.compute()
    assert results["miou"] == results["iou_fg"] == 0.0
    assert results["iou_bin"] == pytest.approx((0 + 16 / 17) / 2)


def test_perfect_soft_prediction_scores_near_one_and_hard_masks_have_no_ap():
    rng = np.random.default_rng(4)
    targets = rng.random((4, 64, 64)) < 0.4
    hard = PaperMetrics()
    hard.update(targets.astype(np.float32), targets)
    results = hard.compute()
    sizes = targets.sum((1, 2))
    assert results["miou"] == pytest.approx(np.mean(sizes / (1 + sizes)))
    assert results["iou_fg"] == pytest.approx(sizes.sum() / (1 + sizes.sum()))
    assert results["iou_fg"] > 0.999 and results["iou_bin"] > 0.999
    assert results["ap"] == 0.0  # one (recall, precision) point: the paper's Simpson AP is degenerate
    # a perfect ranking spread over (0, 1) covers the whole recall range with precision ~1
    probs = np.where(targets, 0.5 + 0.5 * rng.random(targets.shape), 0.5 * rng.random(targets.shape))
    soft = PaperMetrics()
    soft.update(probs, targets)
    assert 0.9 < soft.compute()["ap"] <= 1.0


def test_ap_rises_with_the_signal_in_the_prediction():
    aps = []
    for signal in (0.0, 0.25, 0.5):
        probs, targets = random_batch(5, shape=(6, 32, 32), signal=signal)
        metrics = PaperMetrics()
        metrics.update(probs, targets)
        aps.append(metrics.compute()["ap"])
    assert aps[0] < aps[1] < aps[2]
    assert aps[0] == pytest.approx(0.3, abs=0.05)  # chance level: the foreground rate


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), factor=st.floats(0.0, 0.95))
def test_ap_never_drops_when_background_probabilities_fall(seed, factor):
    """Lowering only background probabilities keeps every recall and can only raise every precision."""
    probs, targets = random_batch(seed, shape=(3, 24, 24))
    before, after = PaperMetrics(), PaperMetrics()
    before.update(probs, targets)
    after.update(np.where(targets, probs, probs * factor), targets)
    assert after.compute()["ap"] >= before.compute()["ap"] - 1e-12


@settings(max_examples=40, deadline=None)
@given(
    probs=arrays(np.float64, (2, 5, 7), elements=st.floats(0, 1)),
    targets=arrays(np.bool_, (2, 5, 7)),
)
def test_every_paper_metric_lies_in_zero_one(probs, targets):
    metrics = PaperMetrics()
    metrics.update(probs, targets)
    results = metrics.compute()
    for name in ("miou", "iou_fg", "iou_bin"):
        assert 0.0 <= results[name] <= results[f"{name}_best"] <= 1.0
    for curve in metrics.curves().values():
        assert ((curve >= 0) & (curve <= 1)).all()


def test_papers_simpson_ap_can_leave_zero_one_on_sparse_recalls():
    """Found by hypothesis: recalls 1/71, 2/71, 70/71 are so unevenly spaced that Simpson's parabola overshoots.
    Faithful to the paper (no clipping); on real test sets the 49 recall points are dense and AP stays in [0, 1]."""
    probs = np.full((2, 5, 7), 0.5)
    probs[0, 0, :2] = 0.75, 1.0
    metrics = PaperMetrics()
    metrics.update(probs, np.ones_like(probs, dtype=bool))
    h0, h1 = Fraction(1, 71), Fraction(68, 71)  # precisions 1/2, 2/3, 70/71 at those recalls
    weights = (2 - h1 / h0, (h0 + h1) ** 2 / (h0 * h1), 2 - h0 / h1)
    expected = (h0 + h1) / 6 * sum(w * p for w, p in zip(weights, (Fraction(1, 2), Fraction(2, 3), Fraction(70, 71))))
    assert metrics.compute()["ap"] == pytest.approx(float(expected), abs=1e-12)
    assert float(expected) > 2.5


def test_average_precision_ignores_thresholds_without_predictions_and_duplicates():
    tp = np.array([4, 4, 2, 2, 0])
    fp = np.array([4, 0, 0, 0, 0])
    fn = 4 - tp
    # pairs (recall, precision): (4/5, 4/9), (4/5, 4/5), (2/5, 2/3) twice; sorted: (2/5, 2/3), (4/5, 4/9), (4/5, 4/5)
    expected = simpson([2 / 3, 4 / 9, 4 / 5], x=[2 / 5, 4 / 5, 4 / 5])
    assert average_precision(tp, fp, fn) == pytest.approx(expected, abs=1e-15)
    assert average_precision(tp[:2], fp[:2], fn[:2]) == 0.0  # one distinct recall, still two pairs: zero width


def test_report_threshold_selects_the_row():
    probs, targets = random_batch(6)
    at_05, default = PaperMetrics(report_threshold=0.5), PaperMetrics()
    for metrics in (at_05, default):
        metrics.update(probs, targets)
    assert at_05.compute()["threshold"] == 0.5
    assert at_05.compute()["miou"] == pytest.approx(default.curves()["miou"][24])
    with pytest.raises(ValueError, match="one of 0.02"):
        PaperMetrics(report_threshold=0.33)


def test_compute_without_samples_raises():
    with pytest.raises(ValueError, match="no samples"):
        PaperMetrics().compute()
    with pytest.raises(ValueError, match="no tasks"):
        PhraseCutMetrics().compute()


def test_memory_does_not_grow_with_the_number_of_samples():
    probs, targets = random_batch(7, shape=(2, 8, 8))
    paper, official = PaperMetrics(), PhraseCutMetrics()
    sizes = []
    for step in range(1000):
        paper.update(probs, targets)
        official.update(probs[0] > 0.5, targets[0], phrase_type="name", n_instances=1 + step % 6)
        if step in (9, 999):
            sizes.append((len(pickle.dumps(paper)), len(pickle.dumps(official))))
    assert paper.n_samples == 2000 and official.totals.n_tasks == 1000
    for small, large in zip(*sizes):
        assert large <= small + 64  # counters needing a wider integer encoding; per-sample storage would add KBs


# ---------------------------------------------------------------------------------------------------- IoU


def test_binary_iou_hand_cases():
    empty, full = np.zeros((3, 4), dtype=bool), np.ones((3, 4), dtype=bool)
    half = full.copy()
    half[:, 2:] = False
    assert binary_iou(full, full) == 1.0
    assert binary_iou(half, full) == 0.5
    assert binary_iou(empty, full) == 0.0
    assert binary_iou(empty, empty) == 0.0  # PhraseCut: empty intersection gives 0
    assert binary_iou(empty, empty, both_empty=1.0) == 1.0  # the mask measurements': nothing to find, nothing found
    assert binary_iou(empty, full, both_empty=1.0) == binary_iou(full, empty, both_empty=1.0) == 0.0
    assert binary_iou(torch.from_numpy(half).int(), half.astype(np.float32)) == 1.0
    with pytest.raises(ValueError, match="binary mask"):
        binary_iou(half * 255, half)
    with pytest.raises(ValueError, match="same shape"):
        binary_iou(half, half.T)


@settings(max_examples=60, deadline=None)
@given(a=arrays(np.bool_, (4, 6)), b=arrays(np.bool_, (4, 6)))
def test_binary_iou_is_symmetric_bounded_and_one_only_for_equal_masks(a, b):
    iou = binary_iou(a, b)
    assert iou == binary_iou(b, a)
    assert 0.0 <= iou <= 1.0
    assert (iou == 1.0) == (bool(np.array_equal(a, b)) and bool(a.any()))


def test_ious_at_thresholds_equal_binary_iou_per_threshold():
    probs, targets = random_batch(8, shape=(1, 30, 40))
    thresholds = (0.1, 0.2, 0.3, 0.4, 0.5)
    ious = ious_at_thresholds(probs[0], targets[0], thresholds)
    assert ious.shape == (5,)
    np.testing.assert_allclose(ious, [binary_iou(probs[0] > t, targets[0]) for t in thresholds], rtol=0, atol=1e-15)
    reordered = ious_at_thresholds(torch.from_numpy(probs[0]), targets[0], thresholds[::-1])
    np.testing.assert_allclose(reordered, ious[::-1], rtol=0, atol=1e-15)
    assert (ious_at_thresholds(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool)) == 0).all()


# ---------------------------------------------------------------------------------------------------- PhraseCut


def test_phrasecut_metrics_equal_brute_force_with_subsets():
    rng = np.random.default_rng(9)
    metrics = PhraseCutMetrics()
    records = []  # (iou, intersection, union, subsets)
    for task in range(40):
        height, width = rng.integers(5, 30, size=2)
        gt = rng.random((height, width)) < rng.choice([0.01, 0.1, 0.5])
        pred = np.where(rng.random(gt.shape) < 0.8, gt, ~gt)
        phrase_type, n_instances = ("name", "attribute", "relation", "verbose")[task % 4], 1 + task % 7
        iou = metrics.update(pred, gt, phrase_type=phrase_type, n_instances=n_instances)
        intersection, union = (pred & gt).sum(), (pred | gt).sum()
        assert iou == (intersection / union if intersection else 0.0)
        fraction = gt.mean()
        size = "small" if fraction < 0.02 else "large" if fraction > 0.2 else "mid"
        count_subset = "instances=1" if n_instances == 1 else "instances>1" if n_instances < 5 else "instances>=5"
        subsets = {f"type={phrase_type}", f"size={size}", count_subset}
        records.append((iou, intersection, union, subsets))
    results = metrics.compute()

    def expected(rows):
        ious = np.array([r[0] for r in rows])
        summary = {"mean_iou": ious.mean(), "cum_iou": sum(r[1] for r in rows) / sum(r[2] for r in rows)}
        summary |= {f"acc@{level}": (ious > level).mean() for level in (0.5, 0.6, 0.7, 0.8, 0.9)}
        return summary | {"n_tasks": len(rows)}

    assert results.keys() == expected(records).keys() | {"subsets"}
    for key, value in expected(records).items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    names = set().union(*(r[3] for r in records))
    assert set(results["subsets"]) == names
    assert list(results["subsets"])[:4] == ["type=name", "type=attribute", "type=relation", "type=verbose"]
    for name in names:
        for key, value in expected([r for r in records if name in r[3]]).items():
            assert results["subsets"][name][key] == pytest.approx(value, abs=1e-12), (name, key)


def test_phrasecut_accuracy_needs_iou_strictly_above_the_level():
    gt = np.zeros((2, 4), dtype=bool)
    gt[0] = True
    pred = np.zeros_like(gt)
    pred[0, :2] = True  # IoU exactly 0.5
    metrics = PhraseCutMetrics()
    assert metrics.update(pred, gt) == 0.5
    results = metrics.compute()
    assert results["acc@0.5"] == 0.0 and results["mean_iou"] == results["cum_iou"] == 0.5
    assert list(results["subsets"]) == ["size=large"]  # no type or instance count given: only the size subset


def test_phrasecut_size_subset_boundaries():
    assert phrasecut_subsets(0.0199) == ["size=small"]
    assert phrasecut_subsets(0.02) == ["size=mid"]
    assert phrasecut_subsets(0.2) == ["size=mid"]
    assert phrasecut_subsets(0.2001) == ["size=large"]
    assert phrasecut_subsets(0.5, "relation", 1) == ["type=relation", "instances=1", "size=large"]
    # exclusive, as the official code's i_single / i_multi (2 to 4) / i_many (5 or more)
    assert phrasecut_subsets(0.5, None, 4) == ["instances>1", "size=large"]
    assert phrasecut_subsets(0.5, None, 5) == ["instances>=5", "size=large"]
    with pytest.raises(ValueError, match="n_instances must be >= 1"):
        phrasecut_subsets(0.5, None, 0)


def test_phrasecut_rejects_batches_and_probabilities():
    metrics = PhraseCutMetrics()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        metrics.update(np.zeros((2, 4, 4), dtype=bool), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="probs > 0.3"):
        metrics.update(np.full((4, 4), 0.7), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(np.zeros((4, 4), dtype=bool), np.zeros((4, 5), dtype=bool))


# ---------------------------------------------------------------------------------------------------- states


def fresh_metrics() -> list:
    return [PaperMetrics(), PhraseCutMetrics(), EpisodeMetrics(), ZeroShotMetrics([0, 1, 2], [3, 4], n_classes=5)]


def metric_parts(seed: int = 0, n_parts: int = 3, per_part: int = 4):
    """The four metrics classes fed part by part with random samples: ([`fresh_metrics()` per part], the same
    classes fed everything in one object)."""
    rng = np.random.default_rng(seed)
    parts, whole = [], fresh_metrics()
    for _ in range(n_parts):
        part = fresh_metrics()
        for _ in range(per_part):
            probs = rng.random((1, 12, 10)).astype(np.float32)
            targets = rng.random((1, 12, 10)) < rng.random()
            kind, instances = rng.choice(["name", "relation", "odd/type"]), int(rng.integers(1, 7))
            class_id = int(rng.integers(1, 4))
            labels, prediction = rng.integers(0, 5, (6, 6)), rng.integers(0, 5, (6, 6))
            labels[0, 0] = 255  # ignored
            for metrics in (part, whole):
                metrics[0].update(probs, targets)
                metrics[1].update(probs[0] > 0.3, targets[0], phrase_type=kind, n_instances=instances)
                metrics[2].update(probs[0], targets[0], class_id, valid=probs[0] < 0.9)
                metrics[3].update(labels, prediction)
        parts.append(part)
    return parts, whole


def test_summed_states_give_the_metrics_of_all_samples():
    parts, whole = metric_parts()
    for index, (single, merged) in enumerate(zip(whole, fresh_metrics())):
        merged.load_state(sum_states(part[index].state() for part in parts))
        assert_close(merged.compute(), single.compute(), rel=1e-12)  # float sums: another order, same to rounding
        state, merged_state = single.state(), merged.state()
        assert state.keys() == merged_state.keys()
        for key, value in state.items():
            if value.dtype == np.int64:
                np.testing.assert_array_equal(merged_state[key], value)  # counts add exactly
            else:
                np.testing.assert_allclose(merged_state[key], value, rtol=1e-14)


def test_a_state_loaded_back_computes_the_same_and_survives_pickling():
    _, whole = metric_parts(seed=1)
    for metrics, copy in zip(whole, fresh_metrics()):
        copy.load_state(pickle.loads(pickle.dumps(metrics.state())))
        assert copy.compute() == metrics.compute()
        state = metrics.state()
        assert all(v.dtype in (np.int64, np.float64) for v in state.values())
        next(iter(state.values()))[...] = 0  # a copy: the accumulator is not changed
        assert copy.compute() == metrics.compute()


def test_the_sum_of_no_states_is_no_samples_and_a_wrong_shape_is_refused():
    paper = PaperMetrics()
    paper.load_state(sum_states([]))
    with pytest.raises(ValueError, match="no samples"):
        paper.compute()
    with pytest.raises(ValueError, match=r"'tp' has shape \(3,\), expected \(49,\)"):
        paper.load_state({"tp": np.zeros(3, np.int64)})


# ------------------------------------------------------------------ the benchmarks' metrics (one-shot, zero-shot)

EPISODE_THRESHOLDS = np.round(np.arange(1, 50) * 0.02, 2)


def random_episodes(seed: int, count: int = 12):
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        height, width = rng.integers(5, 20, size=2)
        probs = rng.random((height, width)).astype(np.float32)
        target = rng.random((height, width)) < 0.3
        valid = rng.random((height, width)) < 0.8
        episodes.append((probs, target, valid, int(rng.choice([3, 7, 11]))))
    return episodes


def brute_force(episodes, at: int) -> dict:
    counts = {}
    for probs, target, valid, class_id in episodes:
        positive = probs[valid][None] > EPISODE_THRESHOLDS[:, None]
        truth = target[valid][None]
        tp, fp = (positive & truth).sum(1), (positive & ~truth).sum(1)
        fn, tn = (~positive & truth).sum(1), (~positive & ~truth).sum(1)
        counts[class_id] = counts.get(class_id, 0) + np.stack([tp, fp, fn, tn]).astype(float)
    class_iou = {c: v[0] / (1 + v[0] + v[1] + v[2]) for c, v in counts.items()}
    tp, fp, fn, tn = sum(counts.values())
    fg, bg = tp / (1 + tp + fp + fn), tn / (1 + tn + fp + fn)
    predicted = tp + fp > 0
    pairs = sorted(
        set(zip(tp[predicted] / (1 + tp[predicted] + fn[predicted]), tp[predicted] / (1 + tp + fp)[predicted]))
    )
    hsnet = {c: v[0][at] / max(v[0][at] + v[1][at] + v[2][at], 1) for c, v in counts.items()}
    return {
        "miou": np.mean([iou[at] for iou in class_iou.values()]),
        "miou_curve": np.mean(list(class_iou.values()), axis=0),
        "iou_fg": fg[at],
        "iou_bin": (fg[at] + bg[at]) / 2,
        "ap": simpson([p for _, p in pairs], x=[r for r, _ in pairs]),
        "hsnet_miou": np.mean(list(hsnet.values())),
        "fb_iou": (tp[at] / (tp[at] + fp[at] + fn[at]) + tn[at] / (tn[at] + fp[at] + fn[at])) / 2,
        "per_class": {c: iou[at] for c, iou in class_iou.items()},
        "episodes": {c: sum(1 for e in episodes if e[3] == c) for c in counts},
    }


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.3), (1, 0.1), (2, 0.5)])
def test_episode_metrics_equal_brute_force(seed, threshold):
    episodes = random_episodes(seed)
    metrics = EpisodeMetrics(threshold)
    for probs, target, valid, class_id in episodes:
        metrics.update(probs, target, class_id, valid=valid)
    at = int(np.flatnonzero(np.isclose(EPISODE_THRESHOLDS, threshold))[0])
    expected, results = brute_force(episodes, at), metrics.compute()
    for name in ("miou", "iou_fg", "iou_bin", "ap", "hsnet_miou", "fb_iou"):
        assert results[name] == pytest.approx(expected[name], abs=1e-12), name
    assert results["miou_best"] == pytest.approx(expected["miou_curve"].max())
    assert results["miou_best_threshold"] == EPISODE_THRESHOLDS[int(np.argmax(expected["miou_curve"]))]
    for class_id, row in results["per_class"].items():
        assert row["iou"] == pytest.approx(expected["per_class"][class_id])
        assert row["n_episodes"] == expected["episodes"][class_id]
    assert results["n_episodes"] == len(episodes)


def test_episode_metrics_memory_does_not_grow_with_episodes():
    metrics = EpisodeMetrics()
    probs, target = np.full((4, 4), 0.9, np.float32), np.eye(4, dtype=bool)
    for _ in range(200):
        metrics.update(probs, target, 5)
    assert list(metrics.counts) == [5] and metrics.counts[5].shape == (4, 49)
    assert metrics.compute()["per_class"][5]["iou"] == pytest.approx(800 / (1 + 800 + 2400))
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(probs, target[:2], 5)


def test_zero_shot_metrics_equal_a_confusion_matrix_reference():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 21, size=(3, 16, 16))
    gt[rng.random(gt.shape) < 0.1] = 255
    gt[gt == 7] = 6  # class 7 absent from the ground truth ...
    pred = rng.integers(0, 21, size=gt.shape)
    pred[pred == 7] = 8  # ... and from the prediction: IoU 0, as JoEm's nan_to_num gives
    seen, unseen = [c for c in range(21) if c not in (1, 10, 14, 18)], [1, 10, 14, 18]
    metrics = ZeroShotMetrics(seen, unseen)
    for g, p in zip(gt, pred):
        metrics.update(g, p)
    matrix = np.zeros((21, 21))
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            matrix[g, p] += 1
    iou = [matrix[c, c] / (matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]) if c != 7 else 0.0 for c in range(21)]
    results = metrics.compute()
    assert results["miou_seen"] == pytest.approx(np.mean([iou[c] for c in seen]))
    assert results["miou_unseen"] == pytest.approx(np.mean([iou[c] for c in unseen]))
    s, u = results["miou_seen"], results["miou_unseen"]
    assert results["harmonic"] == pytest.approx(2 * s * u / (s + u))
    assert results["per_class"][7] == 0.0 and results["pixels"] == int((gt != 255).sum())
    with pytest.raises(ValueError, match="disjoint"):
        ZeroShotMetrics([0, 1], [1, 2])
