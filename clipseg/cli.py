"""Argument types, help formatting and flag bookkeeping shared by the scripts' command lines: each type checks a
value and says what is wrong with it in argparse's own error line. `stop` is how a script ends with a message."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

BAD_INPUT = 2  # a model, data set, option or output path that cannot be used (argparse's usage errors are 2 too)
NOTHING_DONE = 1  # the run went ahead but nothing could be processed, or its results could not be saved


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help text says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def dropout_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated block indices such as 3,6,9, got {text!r}") from None
    if any(i < 0 for i in layers) or list(layers) != sorted(set(layers)):
        raise argparse.ArgumentTypeError(f"must be strictly increasing non-negative indices, got {text!r}")
    return layers


def run_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(
            f"must be a plain directory name (letters, digits, '.', '_', '-'; no '/' or '..'), got {text!r}"
        )
    return text


def step_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated iterations such as 5000,10000, got {text!r}"
        ) from None
    if not steps or steps[0] <= 0:
        raise argparse.ArgumentTypeError(f"must be positive iterations, got {text!r}")
    return steps


def weight_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers A,B such as 0,0.5, got {text!r}") from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= A <= B <= 1, got {text!r}")
    return low, high


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the flags given on the command line (not defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):
                probe.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            elif action.nargs == 0:
                probe.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))


def stop(message: str, code: int = BAD_INPUT) -> NoReturn:
    """End the script: `error: <message>` on stderr, exit status `code` (BAD_INPUT or NOTHING_DONE)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
