"""Timing statistics for ``fxpass bench``, through :mod:`torch.utils.benchmark`.

Every figure the benchmark reports is the median (with its interquartile range) of a
``torch.utils.benchmark.Measurement``:

* :func:`interleaved`: variants compared with each other are timed in rounds; each round
  runs ``Timer.blocked_autorange`` on every variant in turn (its block-size estimate is the
  variant's warm-up in that round), and a variant's rounds merge into one Measurement
  (``Measurement.merge``). A slow drift of the machine hits every variant alike, so their
  ratios hold even where the absolute times do not. ``min_run_time=None`` (``--quick``,
  which only proves the benchmark runs) times one call per round with ``Timer.timeit(1)``
  instead: blocked_autorange's block-size estimate alone runs a call under 10 ms about 11
  times.
* :func:`samples`: timings a Timer cannot repeat (a pass that changes its model needs a
  fresh copy per run, made outside the clock; a first call happens once per model) are taken
  one by one with the Timer's clock and summarised by a Measurement all the same.

Timers run with the process's torch thread count (``Timer``'s default is one thread).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.benchmark.utils.timer import timer as clock

__all__ = ["clock", "iqrs", "interleaved", "interleaved_on_copies", "measure", "medians",
           "samples", "time_once"]


def _timer(fn: Callable[[], Any], label: str) -> Timer:
    return Timer(stmt="fn()", globals={"fn": fn}, label=label,
                 num_threads=torch.get_num_threads())


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int,
                min_run_time: float | None) -> dict[str, Measurement]:
    """One Measurement per variant: ``rounds`` rounds, each a ``blocked_autorange`` of
    every variant in turn (at least ``min_run_time`` seconds of calls each; None: one
    call, ``Timer.timeit(1)``)."""
    timers = {name: _timer(fn, name) for name, fn in fns.items()}
    runs: dict[str, list[Measurement]] = {name: [] for name in fns}
    for _ in range(max(1, rounds)):
        for name, t in timers.items():
            runs[name].append(t.timeit(1) if min_run_time is None
                              else t.blocked_autorange(min_run_time=min_run_time))
    return {name: Measurement.merge(ms)[0] for name, ms in runs.items()}


def measure(fn: Callable[[], Any], rounds: int, min_run_time: float | None,
            label: str = "fn") -> Measurement:
    """One variant's Measurement (:func:`interleaved` with one variant)."""
    return interleaved({label: fn}, rounds, min_run_time)[label]


def samples(times: Iterable[float], label: str) -> Measurement:
    """A Measurement of timings taken one call at a time (seconds per call)."""
    return Measurement(number_per_run=1, raw_times=list(times),
                       task_spec=TaskSpec(stmt=label, setup="pass",
                                          num_threads=torch.get_num_threads()))


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, on the Timer's clock."""
    t0 = clock()
    fn()
    return clock() - t0


def interleaved_on_copies(make: Callable[[], Any], fns: dict[str, Callable[[Any], Any]],
                          rounds: int, collect: bool = True) -> dict[str, Measurement]:
    """Like :func:`interleaved` for passes that change their input: each call gets a fresh
    ``make()`` (made, and with ``collect`` the garbage collected: ~0.1-1 s with torch, vLLM
    and transformers loaded, before the clock starts); one warm-up call per variant first."""
    for fn in fns.values():
        fn(make())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            obj = make()
            if collect:
                gc.collect()
            times[name].append(time_once(lambda: fn(obj)))
    return {name: samples(t, name) for name, t in times.items()}


def medians(ms: dict[str, Measurement]) -> dict[str, float]:
    return {name: m.median for name, m in ms.items()}


def iqrs(ms: dict[str, Measurement]) -> dict[str, float]:
    return {name: m.iqr for name, m in ms.items()}
