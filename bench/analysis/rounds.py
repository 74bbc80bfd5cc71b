"""A run's rounds (`rounds.csv`): paired comparisons between backends and the A/A figure.

A sweep measures in rounds: in each round every backend runs one short timed block per
(dtype, mode, size), in an order that rotates from round to round. Rows of one run and one
round at one (dtype, mode, size) were measured side by side, seconds apart: they are the
PAIRS. A drift of the machine between minutes (other processes, clocks, caches) moves both
members of a pair alike, so the ratio of a pair sees the difference between backends and
not the drift. Pairs are made only within one run and one round: two runs, or two rounds,
were not measured side by side. Runs given together contribute their pairs side by side
(pooled: each (run, round) is one pair).

The paired statistic, per size and pair of backends: the log-ratio of each pair, its median
over the pairs, and a confidence interval for that median from the sign test (the interval
between order statistics d(k) and d(n+1-k) of the n sorted log-ratios, k the largest whose
coverage 1 - 2 P(Binomial(n, 1/2) <= k-1) is at least 95%). Why this and not a t-interval
or a bootstrap: there are few rounds (3-10), a round now and then is wild (another process
took the cores for a second: 21 us where the others say 4 us), and the sign interval needs no
normality and is not moved by one wild pair's size; a bootstrap of 3-10 values gives
intervals too narrow to mean anything. Its price: below 6 pairs no k reaches 95%, and the
interval is the range of the pairs [min, max] (coverage 75% at 3 pairs, 87.5% at 4, 93.8% at
5), which reads simply: "A was faster than B in every round". `Paired.confidence` carries
the coverage reached.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.analysis.results import ROUND_COLUMNS, ROUNDS_FILE

__all__ = [
    "ROUNDS_FILE",
    "ROUND_COLUMNS",
    "Paired",
    "read_rounds",
    "paired",
    "sign_interval",
    "round_figures",
    "paired_table",
    "aa_spread",
    "relative_sd",
]

_INT_COLUMNS = ("world_size", "bytes", "round", "position", "iters")
_TEXT_COLUMNS = ("run_id", "hardware_key", "backend", "dtype", "mode")
# the pair key within one point: which run, which round
PAIR_KEY = ("run_id", "round")
CONFIDENCE = 0.95
MAD_TO_SD = 1.4826  # the MAD of a normal sample times this estimates its SD


def read_rounds(run_dir: str | os.PathLike):
    """A run's rounds.csv as a frame with ROUND_COLUMNS first; an empty frame with those
    columns where the run has none (runs made before rounds). A file that is not a rounds
    table raises ValueError naming the file (and the line, for a bad cell)."""
    import pandas as pd

    path = Path(run_dir)
    if path.is_dir():
        path = path / ROUNDS_FILE
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in ROUND_COLUMNS})
    try:
        data = path.read_bytes()
        if not data.endswith(b"\n"):  # a row cut short by a crash: left out, as --resume does
            data = data[: data.rfind(b"\n") + 1]
        import io

        frame = pd.read_csv(io.BytesIO(data), dtype={c: "string" for c in _TEXT_COLUMNS})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: not a rounds table ({str(exc).splitlines()[0]})") from None
    header = list(frame.columns)
    if tuple(header[: len(ROUND_COLUMNS)]) != ROUND_COLUMNS:
        missing = [c for c in ROUND_COLUMNS if c not in header]
        detail = f"missing {','.join(missing)}" if missing else "columns out of order"
        raise ValueError(
            f"{path}: not a rounds table ({detail}; expected {','.join(ROUND_COLUMNS)})"
        )
    for column in (*_INT_COLUMNS, "latency_us"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() | ((numbers <= 0) if column == "latency_us" else (numbers < 0))
        if bad.any():
            index = bad.to_numpy().nonzero()[0][0]
            raise ValueError(
                f"{path} line {index + 2}: {column}: expected a "
                f"{'positive number' if column == 'latency_us' else 'whole number >= 0'}, "
                f"got {frame[column].iloc[index]!r}"
            )
        frame[column] = numbers.astype(float if column == "latency_us" else int)
    return _rounds_of_groups(frame, path.parent)


GROUP_ROUND_STRIDE = 1000  # rounds of the g-th backend group are numbered from g * this


def _rounds_of_groups(frame, run_dir: Path):
    """Backends measured in separate groups (their buffers did not fit at once: meta.json's
    backend_groups) were never side by side: their rounds are renumbered per group (g * 1000
    + round), so pairs form within a group only; parity, which the held-out split uses, is
    kept."""
    import json

    try:
        groups = json.loads((run_dir / "meta.json").read_text()).get("backend_groups") or []
    except (OSError, ValueError, AttributeError):
        return frame
    if len(groups) < 2:
        return frame
    group_of = {name: g for g, names in enumerate(groups) for name in names}
    offset = frame["backend"].map(lambda b: group_of.get(b, 0) * GROUP_ROUND_STRIDE)
    frame["round"] = frame["round"] + offset.astype(int)
    return frame


def _dtype(column: str) -> str:
    return "int64" if column in _INT_COLUMNS else "float64" if column == "latency_us" else "string"


@dataclasses.dataclass(frozen=True)
class Paired:
    """A over B in the pairs: `ratio` the median over pairs of latency_A / latency_B (< 1: A
    faster), [low, high] the sign interval on that median, reached with `confidence`."""

    ratio: float
    low: float
    high: float
    pairs: int
    confidence: float

    @property
    def separated(self) -> bool:
        """Whether the interval leaves out 1: the data tells the two apart."""
        return self.low > 1.0 or self.high < 1.0


def sign_interval(values: Iterable[float], confidence: float = CONFIDENCE):
    """(low, high, coverage) of the sign-test interval for the median of `values` (module
    docstring): [d(k), d(n+1-k)] for the largest k reaching `confidence`, else [min, max]."""
    d = sorted(values)
    n = len(d)
    if n == 0:
        raise ValueError("sign_interval: no values")
    k, coverage = 1, 1.0 - 2.0 * 0.5**n
    for j in range(2, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(j)) / 2.0**n  # P(Bin(n, .5) <= j-1)
        if 1.0 - 2.0 * tail < confidence:
            break
        k, coverage = j, 1.0 - 2.0 * tail
    return d[k - 1], d[n - k], max(coverage, 0.0)


def paired(a: Mapping[Any, float], b: Mapping[Any, float], min_pairs: int = 2) -> Paired | None:
    """A over B from their round figures keyed alike ((run_id, round) -> latency_us); None
    where fewer than `min_pairs` keys are measured in both (no interval to speak of)."""
    logs = [
        math.log(a[key] / b[key])
        for key in a.keys() & b.keys()
        if a[key] > 0 and b[key] > 0 and math.isfinite(a[key] / b[key])
    ]
    if len(logs) < max(1, min_pairs):
        return None
    low, high, coverage = sign_interval(logs)
    return Paired(
        ratio=math.exp(statistics.median(logs)),
        low=math.exp(low),
        high=math.exp(high),
        pairs=len(logs),
        confidence=coverage,
    )


def round_figures(rounds, by: Iterable[str]) -> dict[tuple, dict[tuple, float]]:
    """{values of `by`: {(run_id, round): latency_us}} from a rounds frame."""
    by = list(by)
    out: dict[tuple, dict[tuple, float]] = {}
    for row in rounds[[*by, *PAIR_KEY, "latency_us"]].itertuples(index=False):
        values = tuple(row)
        key = values[: len(by)]
        out.setdefault(key, {})[(str(values[-3]), int(values[-2]))] = float(values[-1])
    return out


def paired_table(rounds):
    """Per (hardware_key, world_size, dtype, mode, bytes) and pair of backends (a < b by
    name): a over b in the pairs (columns ratio, low, high, pairs, confidence, separated)."""
    import pandas as pd

    point = ["hardware_key", "world_size", "dtype", "mode", "bytes"]
    figures = round_figures(rounds, [*point, "backend"])
    by_point: dict[tuple, dict[str, dict]] = {}
    for key, values in figures.items():
        by_point.setdefault(key[:-1], {})[key[-1]] = values
    rows = []
    for key in sorted(by_point):
        names = sorted(by_point[key])
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                stat = paired(by_point[key][a], by_point[key][b])
                if stat is not None:
                    rows.append(
                        {
                            **dict(zip(point, key, strict=True)),
                            "a": a,
                            "b": b,
                            **dataclasses.asdict(stat),
                            "separated": stat.separated,
                        }
                    )
    return pd.DataFrame(rows)


def relative_sd(latencies_us: Iterable[float]) -> float | None:
    """Robust relative SD of one point's round figures: 1.4826 x the median absolute
    deviation of their natural logs (about the SD / mean for small spreads); None below 2."""
    logs = [math.log(x) for x in latencies_us if x > 0 and math.isfinite(x)]
    if len(logs) < 2:
        return None
    middle = statistics.median(logs)
    return MAD_TO_SD * statistics.median(abs(x - middle) for x in logs)


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def aa_spread(rounds) -> dict[str, Any]:
    """The A/A figure: how much ONE backend's figure for one point moves from round to round.

    Per measured point (run, backend, world size, dtype, mode, size) with at least 2 rounds:
    the robust relative SD of its round figures (`relative_sd`: 1.4826 x MAD of the logs, in
    percent), so a point at 10 us whose rounds read 10, 10.5 and 9.6 us has about 5%.
    Summarised over the points as `median_pct` (a typical point) and `p90_pct` (the noisiest
    tenth), with `points` (how many) and `rounds` (the most rounds a point has).

    Read it as: two round figures of the SAME backend differ by about this much (x sqrt 2) on
    this machine; a difference between two backends no larger than it cannot be decided
    from one round, and takes several paired rounds to tell from noise. Values are None where
    no point has 2 rounds."""
    point = ["run_id", "backend", "world_size", "dtype", "mode", "bytes"]
    sds = []
    most = 0
    for values in round_figures(rounds, point).values():
        most = max(most, len(values))
        sd = relative_sd(values.values())
        if sd is not None:
            sds.append(sd * 100.0)
    return {
        "median_pct": round(statistics.median(sds), 3) if sds else None,
        "p90_pct": round(_quantile(sds, 0.9), 3) if sds else None,
        "points": len(sds),
        "rounds": most,
    }
