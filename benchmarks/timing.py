"""The benchmarks' one timer (interleaved medians, so machine load drifts hit every candidate alike) and their one
ratio table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_seconds(
    fns: dict, repeats: int, warmup: int = 1, clock: Callable[[], float] = time.process_time
) -> dict:
    """`clock` times of each of `fns` (name -> callable), one list of `repeats` per name, after `warmup` rounds; the
    order of the calls alternates between rounds, so round i of every candidate ran back to back.

    `clock` is this process's CPU time by default (less hurt by other processes on a shared machine); pass
    `time.perf_counter` for wall time (needed when the work waits on other processes, as DDP ranks do)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        # Every other round in reverse order: the first call of a round tends to pay for what ran before it.
        for name, fn in list(fns.items())[:: -1 if round_ % 2 else 1]:
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def median_seconds(
    fns: dict, repeats: int, warmup: int = 1, clock: Callable[[], float] = time.process_time
) -> dict:
    """Median `clock` time of each of `fns` over `repeats` interleaved rounds (see `interleaved_seconds`)."""
    return {name: statistics.median(t) for name, t in interleaved_seconds(fns, repeats, warmup, clock).items()}


def print_ratio_table(rows: list[tuple], header: str, precision: int = 2) -> None:
    """Print `header`, then one line per `(name, ratio, goal, met, detail)` row (`met` None: information only)."""
    print(header)
    width = max(len(name) for name, *_ in rows) + 2
    print(f"{'benchmark':<{width}} {'ratio':>7}  {'goal':>8}  {'met':>4}  detail")
    for name, ratio, goal, met, note in rows:
        flag = "-" if met is None else ("yes" if met else "NO")
        print(f"{name:<{width}} {ratio:>6.{precision}f}x  {goal:>8}  {flag:>4}  {note}")
