"""metrics.EpisodeMetrics and metrics.ZeroShotMetrics equal brute-force recomputations (numpy, pixel by pixel)."""

import numpy as np
import pytest
from scipy.integrate import simpson

from clipseg.metrics import EpisodeMetrics, ZeroShotMetrics

THRESHOLDS = np.round(np.arange(1, 50) * 0.02, 2)


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
        positive = probs[valid][None] > THRESHOLDS[:, None]
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
    at = int(np.flatnonzero(np.isclose(THRESHOLDS, threshold))[0])
    expected, results = brute_force(episodes, at), metrics.compute()
    for name in ("miou", "iou_fg", "iou_bin", "ap", "hsnet_miou", "fb_iou"):
        assert results[name] == pytest.approx(expected[name], abs=1e-12), name
    assert results["miou_best"] == pytest.approx(expected["miou_curve"].max())
    assert results["miou_best_threshold"] == THRESHOLDS[int(np.argmax(expected["miou_curve"]))]
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
