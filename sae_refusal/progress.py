"""Console progress of the project's long jobs: timed stages and a prompts/s + ETA printer."""

from __future__ import annotations

import time

__all__ = ["RatePrinter", "Stage"]


class Stage:
    """``with Stage("eval", "capability", timings):`` prints the stage's start and its time.

    Args:
        job: Prefix of the lines (``[job] name ...``).
        name: What the stage does.
        timings: If given, the stage's seconds are stored under ``name``.
    """

    def __init__(self, job: str, name: str, timings: dict[str, float] | None = None) -> None:
        self.job, self.name, self.timings = job, name, timings

    def __enter__(self) -> Stage:
        self.start = time.perf_counter()
        print(f"[{self.job}] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        if self.timings is not None:
            self.timings[self.name] = round(seconds, 2)
        print(f"[{self.job}] {self.name}: {seconds:.1f} s", flush=True)


class RatePrinter:
    """``progress(done, total)`` callback printing ``done/total``, prompts/s and an ETA.

    Args:
        what: Label of the lines.
        prompts_per_unit: Prompts per counted unit (e.g. the prompts of one pass when units are passes).
    """

    def __init__(self, what: str, prompts_per_unit: int = 1) -> None:
        self.what, self.per_unit, self.start = what, prompts_per_unit, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        rate = done * self.per_unit / max(elapsed, 1e-9)
        eta = (total - done) * self.per_unit / max(rate, 1e-9)
        print(f"  {self.what}: {done}/{total}  {rate:.1f} prompts/s  ETA {eta:.0f} s", flush=True)
