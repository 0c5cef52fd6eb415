"""Whether the machine was busy while bench.py measured: the CPU time other processes took during the run (Linux's
/proc/stat, less this process's own), the 1-minute load average at its start and end, and how far the repeats of each
timed variant spread (clipseg/speed/timing.py records them). A busy or noisy run is reported with warnings, printed
and written into the JSON, so that its table is never mistaken for one measured on a quiet machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from clipseg.speed.timing import Spread

BUSY_CORES = 0.25  # other processes using more than a quarter of a core on average during the run
NOISY_SPREAD = 0.10  # a variant whose repeats spread by more than 10% of their median
PROC_STAT = Path("/proc/stat")


class MachineState(NamedTuple):
    """A snapshot taken at the start and at the end of a run (`machine_state`)."""

    wall: float  # time.perf_counter()
    own_cpu: float  # this process's CPU seconds (time.process_time())
    all_cpu: float | None  # CPU seconds every process on the machine has used (/proc/stat), None where unknown
    load: float | None  # 1-minute load average, None where the OS has none


def machine_state() -> MachineState:
    return MachineState(time.perf_counter(), time.process_time(), _all_cpu_seconds(), _load_average())


def _all_cpu_seconds() -> float | None:
    """CPU seconds spent by all processes since boot (user, nice, system, irq, softirq and steal: time taken from the
    guest by the hypervisor counts as busy), from the first line of /proc/stat; None off Linux."""
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / ticks


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def busy_report(start: MachineState, end: MachineState, threads: int, spreads: list[Spread]) -> dict:
    """How busy the machine was between `start` and `end` while this process ran `threads` threads, and how far the
    repeats of the timed variants spread (`spreads`: `timing.repeat_spreads()`): a dict for the JSON whose
    "warnings" are empty on a quiet run; the noisy variants are listed with each repeat's seconds."""
    wall = max(end.wall - start.wall, 1e-9)
    report: dict = {"load_average_1min": {"start": start.load, "end": end.load}, "threads": threads}
    if start.all_cpu is not None and end.all_cpu is not None:
        others = (end.all_cpu - start.all_cpu - (end.own_cpu - start.own_cpu)) / wall
        report["other_processes_cores"] = others = max(others, 0.0)
        source = f"other processes used {others:.2f} cores on average during the run"
    else:  # the load average counts this process's threads once it has run for a minute
        loads = [load for load in (start.load, None if end.load is None else end.load - threads) if load is not None]
        others = max(loads, default=0.0)
        source = f"the load average besides this run's {threads} thread(s) was {others:.2f}"
    warnings = []
    if others > BUSY_CORES:
        warnings.append(f"the machine was busy: {source} (more than {BUSY_CORES})")
    noisy = [timed for timed in spreads if timed.spread > NOISY_SPREAD]
    report["repeat_spread"] = {
        "timed": len(spreads),
        "noisy": len(noisy),
        "worst": max((timed.spread for timed in spreads), default=None),
        "noisy_variants": [timed._asdict() for timed in noisy],
    }
    if noisy:
        worst = max(noisy, key=lambda timed: timed.spread)
        warnings.append(
            f"{len(noisy)} of {len(spreads)} timed variants spread by more than {100 * NOISY_SPREAD:.0f}% of their "
            f"median between repeats (worst: {worst.name}, {100 * worst.spread:.0f}%)"
        )
    report["warnings"] = warnings
    return report


def print_warnings(report: dict) -> None:
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    if report["warnings"]:
        print("WARNING: a busy or noisy run: compare the ratios of variants timed together, not absolute times")
