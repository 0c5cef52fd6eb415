"""How much the paper's AP depends on the integration rule (docs/original.md §8.3), measured on one model.

Scores a PhraseCut-format test split once with `clipseg.scoring.score` (fp32, the project's default pipeline), takes the
precision/recall points the paper's AP integrates (pooled counts of `PaperMetrics` at the 49 thresholds, points with
something predicted, duplicates removed, sorted by recall) and integrates them three ways:

(a) `scipy.integrate.simpson(precision, x=recall)`: what the project reports. Since SciPy 1.11 an even number of
    points is handled with Cartwright's correction on the last interval.
(b) the rule of the original's `scipy.integrate.simps` before SciPy 1.11 (`even='avg'`): for an odd number of points
    plain composite Simpson; for an even number N the mean of [Simpson on points 1..N-1 + trapezoid on the last
    interval] and [trapezoid on the first interval + Simpson on points 2..N]. Simpson on an odd count is the same
    formula in every SciPy version, so it is computed with today's `simpson`.
(c) the trapezoid rule over the same points.

With all 49 thresholds predicting something and no duplicate pairs the curve has 49 points, an odd count, and (a)
and (b) agree exactly. The script therefore also integrates the curve without its lowest-recall point (t = 0.98):
48 points, the even case a model meets when its highest threshold predicts nothing or two thresholds give the same
pair.

    make demo && .venv/bin/python docs/ap_rules.py --model checkpoints/demo --data-root synthetic_phrasecut
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.integrate import simpson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for the clipseg package

from clipseg.loading import LoadError, build_eval_dataset, input_side, load_model  # noqa: E402
from clipseg.metrics import PaperMetrics  # noqa: E402
from clipseg.scoring import score  # noqa: E402


def curve_points(paper: PaperMetrics) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) that the paper's AP integrates: `PaperMetrics.curves()` where tp + fp > 0, unique pairs
    sorted by recall (as `metrics.average_precision` takes them)."""
    curves, predicted = paper.curves(), paper.tp + paper.fp > 0
    pairs = np.unique(np.stack([curves["recall"][predicted], curves["precision"][predicted]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """The trapezoid rule over points sorted by x."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def simps_before_1_11(y: np.ndarray, x: np.ndarray) -> float:
    """SciPy < 1.11 `simps(y, x)` with its default `even='avg'` (1-D)."""
    if len(y) % 2:
        return float(simpson(y, x=x))
    if len(y) == 2:
        return trapezoid(y, x)
    first = simpson(y[:-1], x=x[:-1]) + trapezoid(y[-2:], x[-2:])
    last = trapezoid(y[:2], x[:2]) + simpson(y[1:], x=x[1:])
    return float((first + last) / 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run or checkpoint directory, hub id or .pth")
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "phrasecut"))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    try:
        model = load_model(args.model, None, "cpu", "fp32")
        data = build_eval_dataset(args.data, args.data_root, args.split, input_side(model, None), None)
    except LoadError as err:
        sys.exit(f"error: {err}")
    paper = score(model, data, precision="fp32").paper
    recall, precision = curve_points(paper)
    if len(recall) < 4:
        sys.exit(f"only {len(recall)} distinct precision/recall points: nothing to compare")
    reported = paper.compute()["ap"]
    print(f"{args.model} on {args.data} {args.split}: {paper.n_samples} samples; the project reports AP {reported:.6f}")
    print_rules("the curve", recall, precision)
    print_rules("without its lowest-recall point", recall[1:], precision[1:])


def print_rules(title: str, recall: np.ndarray, precision: np.ndarray) -> None:
    rules = {
        "(a) scipy.integrate.simpson (the project)": float(simpson(precision, x=recall)),
        "(b) simps before SciPy 1.11, even='avg' (the original's)": simps_before_1_11(precision, recall),
        "(c) trapezoid rule": trapezoid(precision, recall),
    }
    print(
        f"{title}: {len(recall)} points ({'even' if len(recall) % 2 == 0 else 'odd'}), recall {recall[0]:.4f} .. "
        f"{recall[-1]:.4f}, precision {precision.min():.4f} .. {precision.max():.4f}, "
        f"equal recalls: {len(recall) - len(np.unique(recall))}"
    )
    reference = rules["(a) scipy.integrate.simpson (the project)"]
    for name, value in rules.items():
        print(f"  {name:58s} {value:.6f}  ({value - reference:+.2e})")


if __name__ == "__main__":
    main()
