"""thresholds.json: round trip and every refusal, each naming the field."""

from __future__ import annotations

import copy
import json

import pytest

from tuner.runtime.schema import Rule, Table, TableError, Thresholds, load, loads


def _doc() -> dict:
    return {
        "schema_version": 1,
        "generated_by": {"tool": "tuner fit", "version": "0.1.0"},
        "tables": [
            {
                "hardware_key": "cpu-test-2c",
                "world_size": 2,
                "dtype": "float32",
                "mode": "eager",
                "rules": [
                    {"max_bytes": 65536, "algorithm": "shm_one_shot"},
                    {"max_bytes": 1048576, "algorithm": "shm_two_shot"},
                    {"max_bytes": None, "algorithm": "gloo"},
                ],
                "max_size": {"shm_one_shot": 65536, "shm_two_shot": 1048576},
                "evidence": {
                    "run_id": "r1",
                    "points": 42,
                    "regret_vs_oracle": 0.01,
                    "gain_vs_nccl_geomean": 1.8,
                    "baseline": "gloo",
                },
            }
        ],
    }


def test_round_trip(tmp_path):
    doc = _doc()
    parsed = loads(json.dumps(doc))
    assert parsed.to_json() == doc
    path = tmp_path / "t.json"
    parsed.save(path)
    again = load(path)
    assert again == parsed
    table = again.find("cpu-test-2c", 2, "float32", "eager")
    assert table is not None
    assert [table.algorithm_for(n).algorithm for n in (1, 65536, 65537, 1 << 20, 1 << 30)] == [
        "shm_one_shot",
        "shm_one_shot",
        "shm_two_shot",
        "shm_two_shot",
        "gloo",
    ]
    assert again.find("cpu-test-2c", 4, "float32", "eager") is None


def test_params_round_trip():
    rules = (Rule(4096, "gloo", {}), Rule(None, "gloo", {}))
    table = Table(
        "k",
        2,
        "bfloat16",
        "eager",
        rules,
        {},
        {"run_id": "x", "points": 1, "regret_vs_oracle": 0.0, "gain_vs_nccl_geomean": None},
    )
    doc = Thresholds(tables=(table,)).to_json()
    assert loads(json.dumps(doc)).tables[0] == table


def _mutate(path, value=None, delete=False):
    doc = _doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


REFUSALS = [
    # (document change, text the one-line error must contain)
    (lambda: _mutate(["schema_version"], 2), "schema_version: expected 1"),
    (lambda: _mutate(["schema_version"], delete=True), "schema_version: missing"),
    (lambda: _mutate(["extra"], 1), "extra: unexpected field"),
    (lambda: _mutate(["tables"], {}), "tables: expected a list"),
    (lambda: _mutate(["generated_by"], "me"), "generated_by: expected an object"),
    (lambda: _mutate(["tables", 0, "world_size"], delete=True), "tables[0].world_size: missing"),
    (lambda: _mutate(["tables", 0, "color"], "red"), "tables[0].color: unexpected field"),
    (
        lambda: _mutate(["tables", 0, "world_size"], "2"),
        "tables[0].world_size: expected an integer",
    ),
    (
        lambda: _mutate(["tables", 0, "world_size"], True),
        "tables[0].world_size: expected an integer",
    ),
    (
        lambda: _mutate(["tables", 0, "world_size"], 0),
        "tables[0].world_size: expected an integer >= 1",
    ),
    (
        lambda: _mutate(["tables", 0, "hardware_key"], 7),
        "tables[0].hardware_key: expected a non-empty",
    ),
    (lambda: _mutate(["tables", 0, "dtype"], "int8"), "tables[0].dtype: expected one of"),
    (lambda: _mutate(["tables", 0, "mode"], "lazy"), "tables[0].mode: expected one of"),
    (lambda: _mutate(["tables", 0, "rules"], []), "tables[0].rules: expected a non-empty list"),
    (
        lambda: _mutate(["tables", 0, "rules", 1, "max_bytes"], 1024),
        "tables[0].rules[1].max_bytes: expected more than 65536",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 1, "max_bytes"], 65536),
        "tables[0].rules[1].max_bytes: expected more than 65536",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 2, "max_bytes"], 1 << 30),
        "tables[0].rules[2].max_bytes: expected null (the last rule is the catch-all)",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "max_bytes"], None),
        "tables[0].rules[0].max_bytes: null is only allowed in the last rule",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "max_bytes"], 1.5),
        "tables[0].rules[0].max_bytes: expected an integer > 0 or null",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "max_bytes"], -4),
        "tables[0].rules[0].max_bytes: expected an integer > 0 or null",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "algorithm"], "magic_ar"),
        "tables[0].rules[0].algorithm: expected a known algorithm",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "algorithm"], 3),
        "tables[0].rules[0].algorithm: expected a string",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "max_bytes"], delete=True),
        "tables[0].rules[0].max_bytes: missing",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 0, "why"], "fast"),
        "tables[0].rules[0].why: unexpected field",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 2, "params"], {"channels": [1]}),
        "tables[0].rules[2].params.channels: expected",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 2, "params"], {"nonexistent_knob": 1}),
        "tables[0].rules[2].params.nonexistent_knob: gloo has no knob",
    ),
    (
        lambda: _mutate(["tables", 0, "rules", 2, "params"], "fast"),
        "tables[0].rules[2].params: expected an object",
    ),
    (
        lambda: _mutate(["tables", 0, "max_size", "shm_one_shot"], delete=True),
        "tables[0].max_size.shm_one_shot: missing",
    ),
    (
        lambda: _mutate(["tables", 0, "max_size", "shm_one_shot"], 1024),
        "tables[0].max_size.shm_one_shot: expected >= 65536",
    ),
    (
        lambda: _mutate(["tables", 0, "max_size", "shm_one_shot"], "64K"),
        "tables[0].max_size.shm_one_shot: expected an integer > 0",
    ),
    (
        lambda: _mutate(["tables", 0, "max_size", "nccl"], 1024),
        "tables[0].max_size.nccl: unexpected (no rule uses nccl)",
    ),
    (lambda: _mutate(["tables", 0, "max_size"], []), "tables[0].max_size: expected an object"),
    (
        lambda: _mutate(["tables", 0, "evidence", "points"], delete=True),
        "tables[0].evidence.points: missing",
    ),
    (
        lambda: _mutate(["tables", 0, "evidence", "points"], "many"),
        "tables[0].evidence.points: expected an integer >= 0",
    ),
    (
        lambda: _mutate(["tables", 0, "evidence", "regret_vs_oracle"], -0.5),
        "tables[0].evidence.regret_vs_oracle: expected a number >= 0",
    ),
    (
        lambda: _mutate(["tables", 0, "evidence", "mood"], "good"),
        "tables[0].evidence.mood: unexpected field",
    ),
    (lambda: _mutate(["tables", 0, "evidence"], None), "tables[0].evidence: expected an object"),
]


@pytest.mark.parametrize("make,message", REFUSALS)
def test_refusals_name_the_field(make, message):
    with pytest.raises(TableError) as info:
        loads(json.dumps(make()), source="T.json")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("T.json: ")
    assert message in text, text


def test_duplicate_tables_are_refused():
    doc = _doc()
    doc["tables"].append(copy.deepcopy(doc["tables"][0]))
    with pytest.raises(TableError, match=r"tables\[1\]: duplicate of tables\[0\]"):
        loads(json.dumps(doc))


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ('{"schema_version": 1, "schema_version": 1}', "schema_version: appears twice"),
        ("[1, 2]", "file: expected a JSON object"),
        ('{"schema_version": NaN}', "not JSON: NaN"),
    ],
)
def test_not_json_is_refused(text, message):
    with pytest.raises(TableError, match=message):
        loads(text)


def test_missing_file_and_a_pickle_are_refused(tmp_path):
    with pytest.raises(TableError, match="no such file"):
        load(tmp_path / "absent.json")
    import pickle

    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(_doc()))
    with pytest.raises(TableError, match="cannot read|not JSON"):
        load(path)


# ------------------------------------------------------------------ hostile tables (issue 21)
def _hostile_texts() -> list[tuple[str, str, str]]:
    """(id, file text, what the one line must name)."""
    huge = json.dumps(_doc()).replace('"max_bytes": 65536', '"max_bytes": 1' + "0" * 5000, 1)
    deep = '{"schema_version": 1, "generated_by": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000
    deep_list = "[" * 100_000 + "]" * 100_000
    shallow_but_deep = _doc()
    shallow_but_deep["generated_by"] = json.loads('{"a": ' * 40 + "1" + "}" * 40)
    big_int = _doc()
    big_int["tables"][0]["evidence"]["points"] = 2**60
    knob = _doc()
    knob["tables"][0]["rules"][0]["params"] = {"chunk_bytes": "big"}
    many_rules = _doc()
    table = many_rules["tables"][0]
    table["rules"] = [{"max_bytes": 4 * (i + 1), "algorithm": "gloo"} for i in range(10_001)]
    table["rules"][-1]["max_bytes"] = None
    table["max_size"] = {}
    many_tables = _doc()
    many_tables["tables"] = [
        {**copy.deepcopy(_doc()["tables"][0]), "world_size": ws} for ws in range(1, 1026)
    ]
    configs = _doc()
    table = configs["tables"][0]
    table["rules"] = [
        {"max_bytes": 64 * (i + 1), "algorithm": "shm_one_shot", "params": params}
        for i, params in enumerate(
            {"threads": t, "spin": s, "yield_us": y}
            for t in (-1, 0, 1, 2, 4)
            for s in (-1, 0, 50, 1000)
            for y in (-1, 0, 100, 10000)
        )
    ] + [{"max_bytes": None, "algorithm": "gloo"}]
    table["max_size"] = {"shm_one_shot": 64 * 80}
    return [
        ("integer-5000-digits", huge, "tables[0].rules[0].max_bytes"),
        ("nested-100000", deep, "nested deeper than 32"),
        ("list-nested-100000", deep_list, "nested deeper than 32"),
        ("generated-by-40-deep", json.dumps(shallow_but_deep), "generated_by.a"),
        ("integer-beyond-2-53", json.dumps(big_int), "tables[0].evidence.points"),
        ("knob-wrong-type", json.dumps(knob), "tables[0].rules[0].params.chunk_bytes"),
        ("rules-10001", json.dumps(many_rules), "tables[0].rules: expected at most 10000"),
        ("tables-1025", json.dumps(many_tables), "tables: expected at most 1024"),
        ("configurations-65", json.dumps(configs), "distinct algorithm + params"),
        ("file-over-16mib", " " * (16 * 1024 * 1024 + 1), "at most 16777216 bytes"),
    ]


HOSTILE = _hostile_texts()


@pytest.mark.parametrize("text,names", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_tables_are_refused_in_one_line(text, names, tmp_path):
    """The API raises the project's own TableError, naming the file and the field, from the
    loader and from Dispatcher.from_file (which loads before touching any group)."""
    from tuner.runtime.dispatch import Dispatcher

    path = tmp_path / "hostile.json"
    path.write_text(text)
    for call in (lambda: loads(text, source=str(path)), lambda: load(path)):
        with pytest.raises(TableError) as info:
            call()
        line = str(info.value)
        assert "\n" not in line and line.startswith(str(path)) and names in line, line
        assert len(line) < 400, line
    with pytest.raises(TableError, match="hostile.json"):
        Dispatcher.from_file(path)


def test_a_table_at_the_limits_loads():
    """The limits are not off by one: 10,000 rules and integers of 2**53 are allowed."""
    doc = _doc()
    table = doc["tables"][0]
    table["rules"] = [{"max_bytes": 4 * (i + 1), "algorithm": "gloo"} for i in range(10_000)]
    table["rules"][-1]["max_bytes"] = None
    table["max_size"] = {}
    table["evidence"]["points"] = 2**53
    assert len(loads(json.dumps(doc)).tables[0].rules) == 10_000
