"""Timing in-process code on a shared, noisy machine: shared by the decoding benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def rates(functions: list[Callable[[], Any]], seconds: float) -> list[float]:
    """Calls per second of each function: the fastest of many short rounds (about 10 ms each), as timeit advises.

    The rounds of the functions alternate, so a decoder and its floor meet the same conditions; on a shared
    machine other processes slow some rounds down, and the fastest round is the one they disturbed least.
    """
    sizes = []
    for function in functions:
        calls = 1
        while True:  # calls per round: about 10 ms
            start = time.perf_counter()
            for _ in range(calls):
                function()
            if time.perf_counter() - start >= 0.01:
                break
            calls *= 2
        sizes.append(calls)
    best = [float("inf")] * len(functions)
    deadline = time.perf_counter() + seconds * len(functions)
    while time.perf_counter() < deadline:
        for index, (function, calls) in enumerate(zip(functions, sizes, strict=True)):
            start = time.perf_counter()
            for _ in range(calls):
                function()
            best[index] = min(best[index], time.perf_counter() - start)
    return [calls / elapsed for calls, elapsed in zip(sizes, best, strict=True)]
