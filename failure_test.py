"""Where does the model fail? A gallery of the test samples it gets wrong at every reasonable threshold.

    python failure_test.py                          # CIDAS/clipseg-rd64-refined on the PhraseCut test split
    python failure_test.py --name demo --data synthetic          # the run checkpoints/demo (= --model demo)
    python failure_test.py --model my_model/ --split val --limit 500 --out failure_cases/val

A sample is a failure when its IoU stays below 0.5 at all five thresholds 0.1, 0.2, 0.3, 0.4, 0.5 (probability
> t). IoUs are measured at the original image resolution, as PhraseCut's official metric does: logits resized
bilinearly to the image size. For every failure, `--out` (default `failure_cases/`, created if missing) gets one
PNG panel named after the task id (image, ground truth overlay, probability heat map, the five binary masks with
their IoU, the phrase as title); `index.html` is a gallery of all panels sorted by best IoU (worst first) and
`failures.csv` lists the same cases. Panels of an earlier run that are no longer failures are removed. The model
runs in fp32 unless `--precision` asks for another (clipseg/precision.py).

`--out` is checked before the model is loaded. Exit status: 0 done; 2 a model, data set, option or `--out` that
cannot be used, or a model whose output is not finite; 1 nothing could be scored, or a file could not be written
(the gallery of the cases found so far is still written when it can be).

Under torchrun (README "Scale out") every rank searches its share of the images and writes their panels; rank 0
writes failures.csv and index.html for all ranks' cases, the same as one process.

This command parses the flags and reports; the search, the panels, failures.csv and the gallery are
clipseg/failures.py, loading the model and the data clipseg/loading.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clipseg.cli import (
    BAD_INPUT,
    NOTHING_DONE,
    add_data_arguments,
    add_scoring_arguments,
    check_common_arguments,
    load_evaluation,
    output_folder,
    run_job,
    stop,
)
from clipseg.distributed import Distributed, check_same_job, in_turn, run_and_exit
from clipseg.failures import (
    FAILURE_IOU,
    INDEX_NAME,
    FailureSearch,
    find_failures,
    merge_search,
    previous_panels,
    write_gallery,
)
from clipseg.outputs import UnwritableOutput, check_writable
from clipseg.samples import SkipLog
from clipseg.transforms import NonFiniteOutput


def write_reports(search: FailureSearch, out: Path, model_name: str, split: str, interrupted: bool) -> str | None:
    """failures.csv and index.html for the cases found so far, worst (lowest best IoU) first, after a summary line
    on stderr. Returns None, or what could not be written."""
    print(
        f"{len(search.cases)} of {search.n_samples} samples fail (IoU < {FAILURE_IOU} at every threshold); "
        f"{len(search.skips.reasons)} skipped. Gallery: {out / INDEX_NAME}",
        file=sys.stderr,
    )
    return write_gallery(search, out, model_name, split, interrupted)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Save every sample whose IoU stays below 0.5 at thresholds 0.1 .. 0.5 as a PNG panel, with an "
        "index.html gallery (worst first) and failures.csv.",
    )
    parser.add_argument(
        "--name",
        default=None,
        metavar="MODEL",
        help="the same as --model, the older form: --name demo analyses the run checkpoints/demo",
    )
    add_scoring_arguments(parser)
    add_data_arguments(parser, benchmarks=False)
    parser.add_argument(
        "--out",
        type=output_folder,
        default="failure_cases",
        metavar="DIR",
        help="folder of the panels, index.html and failures.csv, created if missing (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.name is not None and args.model is not None:
        parser.error(f"give the model once: --name ({args.name}) or --model ({args.model})")
    args.model = args.model or args.name
    check_common_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI. Returns {"out", "n_samples", "n_failures", "cases", "skipped"}; stops with a message and the exit
    status of the module docstring otherwise."""
    return run_job(parse_args(argv), find)


def check_out(out: Path) -> None:
    try:
        check_writable(out, folder=True)
    except UnwritableOutput as err:
        stop(f"--out: {err}")


def find(args: argparse.Namespace, world: Distributed) -> dict:
    """failure_test.py's work on this rank: the panels of its images; the reports (every rank's cases) by rank 0."""
    out = Path(args.out)
    in_turn(world, lambda: check_out(out))  # one rank at a time: probes of a shared folder
    model, source, image_size, data = load_evaluation(args)
    flags = {key: getattr(args, key) for key in ("split", "limit", "image_size", "precision", "resize", "batch_size")}
    check_same_job(world, model, flags, (data.task_info(index).task_id for index in range(len(data))))
    out.mkdir(parents=True, exist_ok=True)
    stale = previous_panels(out)
    search, interrupted, failure = FailureSearch([], 0, SkipLog()), False, None
    try:
        find_failures(
            model,
            data,
            out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            precision=args.precision,
            search=search,
            world=world,
        )
        search = merge_search(search, world)  # every rank's cases, on every rank
    except KeyboardInterrupt:
        interrupted = True
        raise
    except NonFiniteOutput as err:
        failure = (f"stopped after {search.n_samples} samples: {err}", BAD_INPUT)
    except OSError as err:
        failure = (f"stopped after {search.n_samples} samples: cannot write a panel: {err}", NOTHING_DONE)
    finally:
        unsaved = write_reports(search, out, source, args.split, interrupted) if world.is_main else None
    if failure is not None:
        message, code = failure
        stop(message + (f"; {unsaved}" if unsaved else ""), code)
    if unsaved:
        stop(unsaved, NOTHING_DONE)
    for name in stale - {case.panel for case in search.cases} if world.is_main else ():
        (out / name).unlink(missing_ok=True)
    if not search.n_samples:
        stop(f"no sample could be scored ({len(search.skips.reasons)} skipped); see {out / INDEX_NAME}", NOTHING_DONE)
    return {
        "out": str(out),
        "n_samples": search.n_samples,
        "n_failures": len(search.cases),
        "cases": search.cases,
        "skipped": search.skips.reasons,
    }


if __name__ == "__main__":
    run_and_exit(main)
