"""The sweep's rounds: every backend measured side by side, in an order that rotates.

A sweep of R rounds measures each point R times, in short timed blocks: in round r, for each
(dtype, mode, size), every backend runs one block, the backends in an order rotated by r. So
backend A and backend B at one size are always measured seconds apart, never minutes: a drift
of the machine (other processes, clocks, caches) moves both, and the paired difference between
them stays what the backends make it. Each round's figure is kept (`rounds.csv`), so the tuner
can compare backends round by round; the point's row in `results.csv` is the median over rounds
of the round figures, with p10/p90 over every timed iteration of every round.

How the default was chosen (results/cpu-intel-xeon-processor-2c/20261204-stability and
results/nvidia-h200-x1-single/20261204-stability, "How many rounds"): sweeps of 5 and 10 rounds
refitted from their first K rounds. The three tables of three sweeps agreed from 3 rounds on
the H200 and from 5 on the 2-core box, and more rounds changed no table while adding wall time
linearly (a block, a check call and an exchange per backend per round). 5 is also the fewest
rounds at which the paired sign interval reaches ~94% (1 - 2/2^5); at 3 it is 75%.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch

from bench.launch.config import DTYPES
from bench.run.session import create_backend
from bench.run.timing import Stats, bandwidths_gbps, summarize

__all__ = [
    "round_order",
    "per_round",
    "RoundFigure",
    "PointRounds",
    "Block",
    "RoundPlan",
    "lacks_memory",
    "held_groups",
]


def round_order(names: list[str], round_index: int) -> list[str]:
    """The backends in round `round_index`'s order: rotated by one place per round, so each
    backend leads, follows and sits between the others in turn."""
    if not names:
        return []
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def per_round(total: int, rounds: int, minimum: int = 1) -> int:
    """A per-point total (timed iterations, warm-up calls) spread over the rounds."""
    return max(minimum, math.ceil(total / rounds))


@dataclasses.dataclass(frozen=True)
class RoundFigure:
    """One round of one point: its median, every timed iteration, where it sat in the order."""

    latency_us: float
    samples_us: tuple[float, ...]
    position: int


@dataclasses.dataclass
class PointRounds:
    """The rounds of one point gathered so far (those of a resumed run included)."""

    figures: dict[int, RoundFigure] = dataclasses.field(default_factory=dict)

    def add(self, round_index: int, figure: RoundFigure) -> None:
        self.figures[round_index] = figure

    def missing(self, rounds: int) -> list[int]:
        return [r for r in range(rounds) if r not in self.figures]

    def stats(self, nbytes: int, world_size: int) -> Stats:
        """latency = median over rounds of the round medians; p10/p90 over all iterations."""
        pooled = [t for f in self.figures.values() for t in f.samples_us]
        spread = summarize(pooled, nbytes, world_size)
        latency_us = statistics.median(f.latency_us for f in self.figures.values())
        algbw, busbw = bandwidths_gbps(nbytes, latency_us, world_size)
        return dataclasses.replace(
            spread, latency_us=latency_us, algbw_gbps=algbw, busbw_gbps=busbw
        )


@dataclasses.dataclass(frozen=True)
class Block:
    """One backend's short timed block of one point in one round."""

    backend: str
    dtype: str
    mode: str
    nbytes: int
    round: int
    position: int  # in this round's order of the backends held
    seed: int  # the known inputs' seed: one per point and round
    world_size: int

    @property
    def key(self) -> tuple:
        return (self.backend, self.world_size, self.dtype, self.nbytes, self.mode)

    @property
    def what(self) -> tuple:
        """What every rank must agree it measures next."""
        return (self.backend, self.dtype, self.mode, self.nbytes, self.round)

    @property
    def where(self) -> str:
        return f"{self.backend} {self.dtype} {self.mode} {self.nbytes}B round {self.round}"


class RoundPlan:
    """What is left to measure, in rounds, and the rows it makes.

    Every rank holds one (the blocks are the same on every rank); rank 0's also gathers the
    round figures (`resumed`: those a resumed run's rounds.csv holds) and makes the rows:
    a round's row per measured block, a point's row once its last round is in, a skipped
    row (once) for a point no round can measure.
    """

    def __init__(
        self,
        cfg,
        sizes: list[tuple[str, str, int]],
        left: dict[tuple, list[int]],
        resumed: dict[tuple, dict[int, tuple]],
        writes_rows: bool,
    ) -> None:
        self.rounds, self.world_size, self.nnodes = cfg.rounds, cfg.world_size, cfg.nnodes
        self.order, self.sizes = list(cfg.backends), sizes
        self.writes_rows = writes_rows
        # points whose every round a resumed run's rounds.csv holds, but not their row
        self.complete = [key for key, rounds in left.items() if not rounds]
        self.left = {key: list(rounds) for key, rounds in left.items() if rounds}
        self.figures: dict[tuple, PointRounds] = {}
        for key, rounds in resumed.items():
            point = self.figures.setdefault(key, PointRounds())
            for r, (latency_us, samples, position) in rounds.items():
                point.add(r, RoundFigure(latency_us, tuple(samples), position))
        self.blocks_left = sum(len(r) for r in self.left.values())
        # each point's arithmetic, measured once (at its first block measured here)
        self.numerics: dict[tuple, Any] = {}

    def wants_numerics(self, block: Block) -> bool:
        """Whether this block's point still lacks its numerics (the same on every rank)."""
        return block.key not in self.numerics

    def note_numerics(self, block: Block, numerics) -> None:
        """`bench.run.numerics.Numerics` of the block's point, for its row."""
        self.numerics[block.key] = numerics

    def rows_from_rounds(self, base: dict) -> list[dict]:
        """The rows of points whose rounds were all measured before a resume (rank 0)."""
        if not self.writes_rows:
            return []
        return [
            self._point_row(key, self.figures[key], base, correct=True, err=0.0)
            for key in self.complete
        ]

    def backends(self) -> list[str]:
        """The backends with a point left, in the sweep's order."""
        return [b for b in self.order if any(key[0] == b for key in self.left)]

    def skip_backend(self, name: str, reason: str, base: dict) -> Iterator[tuple[dict, int]]:
        """A backend that cannot be built: (its skipped row, blocks it took off) per point."""
        for key in [k for k in self.left if k[0] == name]:
            rounds = self.left.pop(key)
            yield self._skip_row(key, reason, base), len(rounds)

    def blocks(self, held: list[str]) -> Iterator[Block]:
        """The blocks left for the backends `held`: round by round, per (dtype, mode, size)
        every backend, in the round's rotated order. Reads what is left as it goes, so a
        point skipped in one round is not visited again."""
        for r in range(self.rounds):
            for index, (dtype, mode, nbytes) in enumerate(self.sizes):
                for position, name in enumerate(round_order(held, r)):
                    block = Block(
                        name,
                        dtype,
                        mode,
                        nbytes,
                        r,
                        position,
                        seed=1 + (index * len(self.order) + self.order.index(name)) * 1000 + r,
                        world_size=self.world_size,
                    )
                    if r in self.left.get(block.key, ()):
                        yield block

    def record(self, block: Block, outcome: tuple, base: dict) -> tuple[list[dict], int]:
        """A measured block's rows (on rank 0; the other ranks only keep the plan in step)
        and how many blocks it took off: a skipped or wrong point ends its rounds."""
        reason, samples, correct, err = outcome
        key = block.key
        if reason or not correct:
            rounds = self.left.pop(key)
            if reason:
                return [self._skip_row(key, reason, base)], len(rounds)
            figure = RoundFigure(statistics.median(samples), tuple(samples), block.position)
            point = PointRounds({block.round: figure})
            return [self._point_row(key, point, base, correct=False, err=err)], len(rounds)
        figure = RoundFigure(statistics.median(samples), tuple(samples), block.position)
        self.left[key].remove(block.round)
        rows = []
        if self.writes_rows:  # rank 0 keeps the figures and makes the rows
            point = self.figures.setdefault(key, PointRounds())
            point.add(block.round, figure)
            rows.append(self._round_row(block, figure, base))
            if not self.left[key]:
                rows.append(self._point_row(key, point, base, correct=True, err=0.0))
        if not self.left[key]:
            del self.left[key]
        return rows, 1

    def _fields(self, key: tuple, base: dict) -> dict:
        backend, world_size, dtype, nbytes, mode = key
        return {
            **base,
            "backend": backend,
            "world_size": world_size,
            "dtype": dtype,
            "bytes": nbytes,
            "mode": mode,
        }

    def _round_row(self, block: Block, figure: RoundFigure, base: dict) -> dict:
        return {
            **self._fields(block.key, base),
            "round": block.round,
            "position": figure.position,
            "iters": len(figure.samples_us),
            "latency_us": figure.latency_us,
            "samples_us": " ".join(f"{t:.6g}" for t in figure.samples_us),
        }

    def _point_row(self, key, point: PointRounds, base: dict, correct: bool, err) -> dict:
        stats = point.stats(key[3], self.world_size)
        numerics = self.numerics.get(key)  # None: not measured (a resumed point's)
        return {
            **self._fields(key, base),
            "nnodes": self.nnodes,
            "count": key[3] // itemsize(key[2]),
            "iters": sum(len(f.samples_us) for f in point.figures.values()),
            "latency_us": stats.latency_us,
            "p10_us": stats.p10_us,
            "p90_us": stats.p90_us,
            "algbw_gbps": stats.algbw_gbps,
            "busbw_gbps": stats.busbw_gbps,
            # ranks that got different bits: not a correct sum, whatever the exact check said
            "correct": correct and (numerics is None or numerics.same_bits),
            "max_abs_err": err,
            "same_bits": None if numerics is None else numerics.same_bits,
            "numerics": None if numerics is None else numerics.numerics,
            "max_err_ulp": None if numerics is None else numerics.max_err_ulp,
            "skipped_reason": None,
        }

    def _skip_row(self, key: tuple, reason: str, base: dict) -> dict:
        return {
            **self._fields(key, base),
            "nnodes": self.nnodes,
            "count": key[3] // itemsize(key[2]),
            "iters": 0,
            "latency_us": None,
            "p10_us": None,
            "p90_us": None,
            "algbw_gbps": None,
            "busbw_gbps": None,
            "correct": None,
            "max_abs_err": None,
            "same_bits": None,
            "numerics": None,
            "max_err_ulp": None,
            "skipped_reason": reason.replace("\n", " ")[:300],
        }


def lacks_memory(reason: str) -> bool:
    """Whether a backend could not be built for want of memory (its buffers, its segment)."""
    text = reason.lower()
    return any(
        words in text
        for words in (
            "out of memory",
            "outofmemory",
            "cannot allocate memory",
            "no space left on device",
            "not enough shared memory",  # /dev/shm too small for a segment (shm_segment)
        )
    )


def held_groups(names: list[str], cfg, ctx) -> Iterator[tuple[dict, dict]]:
    """The backends the sweep holds, built once and kept for all the rounds: usually one
    group of every backend. Where one cannot be built for want of memory while others are
    held, the ones held are measured first as a group, released, and the rest built as the
    next (`meta.json`'s backend_groups records the grouping; rounds pair only within a group).
    Yields (name -> backend built, name -> why it cannot run here); releases each group,
    in reverse order of building, on every path."""
    pending = list(names)
    while pending:
        group: dict[str, Any] = {}
        reasons: dict[str, str] = {}
        try:
            while pending:
                backend, reason = create_backend(pending[0], cfg, ctx)
                if reason and group and lacks_memory(reason):
                    break  # measure what is held; build this one again in the next group
                name = pending.pop(0)
                if reason:
                    reasons[name] = reason
                else:
                    group[name] = backend
            yield group, reasons
        finally:
            for backend in reversed(list(group.values())):
                backend.release()


def itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()
