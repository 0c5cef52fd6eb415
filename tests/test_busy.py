"""clipseg.speed.busy and bench.py's busy-machine warning: other processes' CPU time, the load average and the spread
of the repeats make a run's table say it was measured on a busy or noisy machine."""

import json

import pytest

import bench
from clipseg.speed import busy, timing

QUIET_START = busy.MachineState(wall=100.0, own_cpu=10.0, all_cpu=500.0, load=0.1)


def after(seconds: float, own: float, others: float, load: float | None = 1.0) -> busy.MachineState:
    """The state `seconds` after QUIET_START, this process having used `own` CPU seconds and others `others`."""
    start = QUIET_START
    return busy.MachineState(start.wall + seconds, start.own_cpu + own, start.all_cpu + own + others, load)


def test_a_quiet_run_has_no_warning():
    report = busy.busy_report(
        QUIET_START, after(60, own=60, others=3), threads=1, spreads=[timing.Spread("ours", 0.02, [1.0, 1.02])]
    )
    assert report["warnings"] == [] and report["other_processes_cores"] == pytest.approx(0.05)
    assert report["repeat_spread"] == {"timed": 1, "noisy": 0, "worst": 0.02, "noisy_variants": []}


def test_other_processes_cpu_time_makes_the_run_busy():
    report = busy.busy_report(QUIET_START, after(60, own=60, others=90), threads=1, spreads=[])
    assert report["other_processes_cores"] == pytest.approx(1.5)
    assert report["warnings"] == [
        "the machine was busy: other processes used 1.50 cores on average during the run (more than 0.25)"
    ]


def test_without_proc_stat_the_load_average_beside_our_threads_decides():
    start, end = QUIET_START._replace(all_cpu=None), after(60, own=120, others=0, load=3.4)._replace(all_cpu=None)
    report = busy.busy_report(start, end, threads=2, spreads=[])
    assert "other_processes_cores" not in report
    assert report["load_average_1min"] == {"start": 0.1, "end": 3.4}
    assert report["warnings"] == [
        "the machine was busy: the load average besides this run's 2 thread(s) was 1.40 (more than 0.25)"
    ]
    quiet = busy.busy_report(start, end._replace(load=2.1), threads=2, spreads=[])
    assert quiet["warnings"] == []


def test_repeats_that_spread_make_the_run_noisy(monkeypatch):
    ticks = iter([0, 1.0, 1.0, 2.0, 2.0, 3.5, 3.5, 4.5, 4.5, 5.5, 5.5, 6.55])  # a: 1, 1.5, 1 s; b: 1, 1, 1.05 s
    monkeypatch.setattr(timing, "clock", lambda: next(ticks))
    timing.clear_repeats()
    medians = timing.interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=0)
    assert medians == {"a": 1.0, "b": pytest.approx(1.0)}
    spreads = timing.repeat_spreads()
    assert [timed.name for timed in spreads] == ["a", "b"] and spreads[0].spread == pytest.approx(0.5)
    report = busy.busy_report(QUIET_START, after(10, own=10, others=0), threads=1, spreads=spreads)
    assert report["repeat_spread"] == {
        "timed": 2,
        "noisy": 1,
        "worst": pytest.approx(0.5),
        "noisy_variants": [{"name": "a", "spread": pytest.approx(0.5), "seconds": [1.0, 1.5, 1.0]}],
    }
    assert report["warnings"] == [
        "1 of 2 timed variants spread by more than 10% of their median between repeats (worst: a, 50%)"
    ]
    timing.clear_repeats()
    assert timing.repeat_spreads() == []


def test_the_proc_stat_reading_counts_busy_ticks_not_idle(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 5000 70 1 2 3 0 0\ncpu0 50 10 15 2500 35 1 1 2 0 0\n")
    monkeypatch.setattr(busy, "PROC_STAT", stat)
    monkeypatch.setattr(busy.os, "sysconf", lambda name: 100)
    assert busy.machine_state().all_cpu == pytest.approx((100 + 20 + 30 + 1 + 2 + 3) / 100)
    monkeypatch.setattr(busy, "PROC_STAT", tmp_path / "absent")
    assert busy.machine_state().all_cpu is None


def test_bench_prints_the_warning_and_writes_it_into_the_json(tmp_path, capsys, monkeypatch):
    states = iter([QUIET_START, after(60, own=60, others=120)])
    monkeypatch.setattr(bench, "machine_state", lambda: next(states))
    monkeypatch.setattr(bench, "measure", lambda args, results: results.update(rows=[]))
    bench.main(["--out", str(tmp_path)])  # a folder, as every command's --out
    out = tmp_path / bench.RESULTS_NAME
    printed = capsys.readouterr().out
    assert "WARNING: the machine was busy: other processes used 2.00 cores" in printed
    assert "compare the ratios of variants timed together" in printed
    written = json.loads(out.read_text())["busy"]
    assert written["other_processes_cores"] == pytest.approx(2.0) and len(written["warnings"]) == 1
