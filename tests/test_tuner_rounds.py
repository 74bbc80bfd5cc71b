"""Rounds in the tuner: the paired decision, the held-out regret, --validate, old runs.

Synthetic runs (tests/rounds_tools.py): each round has a machine drift shared by every
backend measured in it (the pairs see through it) and a small noise of its own."""

from __future__ import annotations

import json
import math
import random

import pytest
from rounds_tools import make_run

from bench.analysis.rounds import aa_spread, paired, read_rounds, sign_interval
from tuner.cli import main
from tuner.runtime.schema import TableError, load, loads
from tuner.table.builder import Curve
from tuner.table.evidence import heldout_regret

SIZES = [1024 * 2**i for i in range(10)]  # 1K .. 512K


def _figures(seed: int, one_over_two, rounds: int = 5) -> dict:
    """shm_one_shot at one_over_two(size) x shm_two_shot; gloo 3x slower; drift 0.8-1.6x per
    round shared by the backends of the round, each figure +-5% of its own."""
    rng = random.Random(seed)
    out = {}
    for nbytes in SIZES:
        base = 5 + nbytes / 1e4
        drift = [rng.uniform(0.8, 1.6) for _ in range(rounds)]
        for name, factor in (
            ("shm_one_shot", one_over_two(nbytes)),
            ("shm_two_shot", 1.0),
            ("gloo", 3.0),
        ):
            out[(name, nbytes)] = [base * factor * d * rng.uniform(0.95, 1.05) for d in drift]
    return out


def _fit(tmp_path, name, figures, *extra, rounds=True):
    run = make_run(tmp_path / name, figures, run_id=name, rounds=rounds)
    out = tmp_path / f"{name}.json"
    assert main(["fit", str(run), "-o", str(out), *extra]) == 0
    return run, load(out).tables[0]


def _rules(table):
    return [(r.max_bytes, r.algorithm) for r in table.rules]


def test_tied_backends_keep_the_simpler_table_in_every_run(tmp_path, capsys):
    """one-shot and two-shot the same within noise: every run gives the same one-rule table,
    and says the two were not separated; without the pairs the runs' tables differ."""
    tables, unpaired = [], []
    for seed in range(3):
        figures = _figures(seed, lambda nbytes: 1.0)
        _, table = _fit(tmp_path, f"tied{seed}", figures)
        tables.append(_rules(table))
        assert table.evidence["rounds"] == 5
        assert table.evidence["ties"], "the undecided span is in the evidence"
        _, old = _fit(tmp_path, f"old{seed}", figures, rounds=False)
        unpaired.append(_rules(old))
    assert tables[0] == tables[1] == tables[2] == [(None, "shm_one_shot")]
    assert len({tuple(rules) for rules in unpaired}) > 1, "without pairs the noise decides"
    out = capsys.readouterr().out
    assert "shm_one_shot and shm_two_shot within noise or the least gain, kept shm_one_shot" in out
    assert "A/A noise" in out and "held out" in out


def test_clearly_separated_backends_switch_at_the_crossover(tmp_path, capsys):
    figures = _figures(7, lambda nbytes: 0.6 if nbytes <= 16384 else 1.5)
    _, table = _fit(tmp_path, "split", figures)
    assert _rules(table) == [(16384, "shm_one_shot"), (None, "shm_two_shot")]
    first, second = table.evidence["per_rule"]
    assert first["runner_up"] == "shm_two_shot" and first["interval"][0] > 1.0
    assert second["runner_up"] == "shm_one_shot" and second["interval"][0] > 1.0
    assert table.evidence["ties"] == []
    assert table.evidence["heldout"]["regret_geomean"] == 0.0
    assert "within noise" not in capsys.readouterr().out


def test_heldout_regret_by_hand():
    """Two sizes, two rounds. Round 0: A gloo 10 / shm 20, B gloo 10 / shm 5; round 1: A gloo
    10 / shm 8, B the same. Fit on round 0 (A gloo, B shm), scored on round 1: A 10/8, B 1;
    fit on round 1 (shm everywhere), scored on round 0: A 20/10, B 1. Geomean over the four
    cells (equal weights): (1.25 x 2)^(1/4) - 1; worst 100% at A."""
    a, b = 1024, 2048
    figures = [
        [{("r", 0): 10.0, ("r", 1): 10.0}, {("r", 0): 10.0, ("r", 1): 10.0}],  # gloo
        [{("r", 0): 20.0, ("r", 1): 8.0}, {("r", 0): 5.0, ("r", 1): 5.0}],  # shm_one_shot
    ]
    curves = [Curve("gloo", {}, [10.0, 10.0]), Curve("shm_one_shot", {}, [14.0, 5.0])]
    result = heldout_regret(
        curves,
        [a, b],
        figures,
        lambda sizes: [1.0 / len(sizes)] * len(sizes),
        world_size=2,
        max_rules=8,
        memory_budget=None,
        preference=[0.0, 1.0],
    )
    assert result["regret_geomean"] == pytest.approx(2.5**0.25 - 1, abs=1e-6)
    assert result["regret_worst"] == pytest.approx(1.0)
    assert result["worst_bytes"] == a and result["worst_in"] == "even rounds"
    assert result["cells"] == 4


def test_old_runs_without_rounds_still_fit_and_say_so(tmp_path, capsys):
    figures = _figures(3, lambda nbytes: 0.5 if nbytes <= 4096 else 2.0)
    _, table = _fit(tmp_path, "old", figures, rounds=False)
    assert table.evidence["rounds"] == 0 and "heldout" not in table.evidence
    assert table.evidence["per_rule"][0]["interval"] is None
    assert _rules(table) == [(4096, "shm_one_shot"), (None, "shm_two_shot")]
    assert "evidence in-sample only" in capsys.readouterr().out


def test_validate_scores_the_table_on_another_run(tmp_path, capsys):
    """Fitted where one-shot wins up to 16K, validated on a run where it never does: the
    regret on the validation run is two-shot's advantage at the sizes the rule sends wrong."""
    fit_run = make_run(
        tmp_path / "a", _figures(1, lambda n: 0.5 if n <= 16384 else 2.0), run_id="a"
    )
    latency = {"shm_two_shot": 10.0, "shm_one_shot": 20.0, "gloo": 30.0}
    other = {(name, n): [us] * 3 for name, us in latency.items() for n in SIZES}
    other_run = make_run(tmp_path / "b", other, run_id="b")
    out = tmp_path / "t.json"
    assert main(["fit", str(fit_run), "-o", str(out), "--validate", str(other_run)]) == 0
    validation = load(out).tables[0].evidence["validation"]
    assert validation["run_ids"] == ["b"] and validation["worst_in"] == "b"
    assert load(out).tables[0].rules[0].max_bytes == 16384
    assert validation["regret_worst"] == pytest.approx(1.0)  # one-shot 2x slower there
    assert validation["worst_bytes"] <= 16384
    # 5 of the 10 sizes (1K..16K, equal weights) at 2x: geomean 2^(5/10) - 1
    assert validation["regret_geomean"] == pytest.approx(2**0.5 - 1, abs=1e-5)
    assert main(["validate", str(out), str(other_run)]) == 0
    assert "on 1 run(s), regret" in capsys.readouterr().out


def test_paired_interval_and_aa_figure():
    assert sign_interval([0.1, -0.2, 0.3])[:2] == (-0.2, 0.3)  # 3 pairs: the range, 75%
    assert sign_interval([0.1, -0.2, 0.3])[2] == pytest.approx(0.75)
    low, high, coverage = sign_interval(range(10))  # k = 2 at 10 pairs: 97.9%
    assert (low, high) == (1, 8) and coverage == pytest.approx(1 - 2 * 11 / 1024)
    stat = paired({("r", 0): 5.0, ("r", 1): 6.0}, {("r", 0): 10.0, ("r", 1): 10.0, ("s", 0): 1})
    assert stat.pairs == 2 and stat.separated and stat.high == pytest.approx(0.6)
    assert paired({("r", 0): 5.0}, {("r", 0): 10.0}) is None  # one pair: no interval


def test_aa_spread_by_hand(tmp_path):
    # one point read 10, 10 x e^0.1, 10 x e^-0.1: MAD of logs 0.1 -> 14.826%
    run = make_run(
        tmp_path / "aa", {("gloo", 1024): [10.0, 10 * math.exp(0.1), 10 * math.exp(-0.1)]}
    )
    aa = aa_spread(read_rounds(run))
    assert aa == {"median_pct": 14.826, "p90_pct": 14.826, "points": 1, "rounds": 3}
    assert aa_spread(read_rounds(tmp_path / "nothing-here"))["median_pct"] is None


def test_a_malformed_rounds_file_is_named(tmp_path):
    run = make_run(tmp_path / "bad", {("gloo", 1024): [1.0, 2.0]})
    text = (run / "rounds.csv").read_text().replace("2.0", "fast")
    (run / "rounds.csv").write_text(text)
    with pytest.raises(ValueError, match=r"rounds.csv line 3: latency_us"):
        read_rounds(run)
    assert main(["fit", str(run), "-o", str(tmp_path / "t.json")]) == 2


def test_new_evidence_loads_and_a_bad_one_is_named(tmp_path):
    _, table = _fit(tmp_path, "ev", _figures(5, lambda n: 0.5))
    doc = {"schema_version": 1, "generated_by": {}, "tables": [table.to_json()]}
    assert loads(json.dumps(doc)).tables[0].evidence == table.evidence
    doc["tables"][0]["evidence"]["per_rule"] = [{"runner_up": 3, "advantage": 1.0}]
    with pytest.raises(TableError, match=r"tables\[0\].evidence.per_rule"):
        loads(json.dumps(doc))


def test_report_prints_the_aa_figure_and_where_it_exceeds_the_gap(tmp_path, capsys):
    from bench.cli import main as bench_main

    tied = make_run(tmp_path / "tied", _figures(0, lambda nbytes: 1.0))
    assert bench_main(["report", str(tied)]) == 0
    out = capsys.readouterr().out
    assert "# A/A noise (one backend, round to round):" in out
    assert "larger than the gap between the best two backends" in out
    old = make_run(tmp_path / "old", _figures(0, lambda nbytes: 1.0), rounds=False)
    assert bench_main(["report", str(old)]) == 0
    assert "A/A noise: not measured (no rounds" in capsys.readouterr().out


def test_rounds_with_more_columns_read_as_the_contract_says(tmp_path):
    """The sweep may keep more per round after the contract's columns (its samples)."""
    run = make_run(tmp_path / "wide", {("gloo", 1024): [1.0, 2.0, 3.0]})
    lines = (run / "rounds.csv").read_text().splitlines()
    wide = [lines[0] + ",samples_us"] + [line + ',"1.0 1.1"' for line in lines[1:]]
    (run / "rounds.csv").write_text("\n".join(wide) + "\n")
    frame = read_rounds(run)
    assert list(frame["latency_us"]) == [1.0, 2.0, 3.0] and list(frame["round"]) == [0, 1, 2]


def _exact_figures(one_over_two) -> dict:
    """No noise at all: shm_one_shot exactly one_over_two(size) x shm_two_shot every round."""
    out = {}
    for nbytes in SIZES:
        base = 5 + nbytes / 1e4
        for name, factor in (("shm_one_shot", one_over_two(nbytes)), ("shm_two_shot", 1.0)):
            out[(name, nbytes)] = [base * factor * d for d in (1.0, 1.1, 0.9, 1.2, 1.05)]
    return out


def test_a_real_but_small_advantage_does_not_move_a_size(tmp_path):
    """shm_one_shot 20% faster up to 16K; above, shm_two_shot 2% faster in every round: the
    pairs call it real, but it is under the least gain (5%): one rule; with --min-gain 0 the
    2% takes the sizes above 16K."""
    figures = _exact_figures(lambda nbytes: 0.8 if nbytes <= 16384 else 1.02)
    _, table = _fit(tmp_path, "small", figures)
    assert _rules(table) == [(None, "shm_one_shot")]
    assert table.evidence["min_gain"] == 0.05 and table.evidence["ties"]
    _, eager = _fit(tmp_path, "small0", figures, "--min-gain", "0")
    assert _rules(eager) == [(16384, "shm_one_shot"), (None, "shm_two_shot")]
    figures = _exact_figures(lambda nbytes: 0.8 if nbytes <= 16384 else 1.10)  # 10%: it moves
    _, moved = _fit(tmp_path, "large", figures)
    assert _rules(moved) == [(16384, "shm_one_shot"), (None, "shm_two_shot")]
