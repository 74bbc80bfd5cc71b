"""`--format nccl-tuner` and `--format nccl-env`: NCCL's own algorithm, protocol and channels
as the table chose them, for any NCCL user.

`nccl-tuner` writes the CSV that NCCL's example tuner plugin reads (NCCL >= 2.27.5;
`NCCL_TUNER_PLUGIN=<its .so>`, `NCCL_TUNER_CONFIG_FILE=<this file>`), one row per size range
of an `nccl` / `pynccl` rule whose algorithm and protocol are set:
`allreduce,min_bytes,max_bytes,algorithm,protocol,channels,nNodes,nRanks,numPipeOps,regBuff`,
bounds inclusive, -1 for "any". The plugin maps an unknown name silently to allreduce / ring /
simple, so every name is checked here. It has no dtype column (tables of several dtypes that
differ are refused without --dtype) and tells a CUDA-graph call only by `regBuff` (1 when
buffers are registered, which capture does by default, NCCL_GRAPH_REGISTER=1).

`nccl-env` writes NCCL_ALGO / NCCL_PROTO / NCCL_MIN_CTAS / NCCL_MAX_CTAS: process-wide and the
same for every size, so only a table whose NCCL rules all agree exports that way.
"""

from __future__ import annotations

from bench.backends import get_spec
from tuner.runtime.schema import Table, Thresholds
from tuner.table.formats.common import NCCL, UNBOUNDED, ExportError, pick_tables, spans

__all__ = ["format_nccl_tuner", "format_nccl_env", "tuner_rows"]

# the example plugin's names (plugins/tuner/example/plugin.c) and NCCL_ALGO / NCCL_PROTO's
_PLUGIN_NAMES = {"ring": "ring", "tree": "tree", "simple": "simple", "ll": "ll", "ll128": "ll128"}
_ENV_NAMES = {"ring": "Ring", "tree": "Tree", "simple": "Simple", "ll": "LL", "ll128": "LL128"}


def _knobs(rule, where: str) -> tuple[str, str, int]:
    """(algo, proto, ctas) of an NCCL rule: its params over its spec's defaults, checked by
    the spec."""
    spec = get_spec(rule.algorithm)
    reason = spec.check_params(rule.params)
    if reason:
        raise ExportError(f"{where}: {reason}")
    params = {**spec.default_params(), **rule.params}
    return params["algo"], params["proto"], int(params["ctas"])


def tuner_rows(table: Table, reg_buff: int) -> tuple[list[str], list[str]]:
    """(CSV rows, notes) of one table."""
    where = f"nccl-tuner: {table.hardware_key} ws{table.world_size} {table.dtype} {table.mode}"
    rows, notes = [], []
    for low, high, rule in spans(table):
        span = f"{low}..{high if high is not None else 'inf'} bytes"
        if rule.algorithm == "pynccl_symm":
            notes.append(
                f"{span}: pynccl_symm: NCCL's symmetric kernels are not steered by the "
                "tuner plugin (NCCL_SYM_KERNEL is process-wide)"
            )
            continue
        if rule.algorithm not in NCCL:
            notes.append(
                f"{span}: {rule.algorithm}, not NCCL (the caller does not call NCCL there)"
            )
            continue
        algo, proto, ctas = _knobs(rule, where)
        if "default" in (algo, proto):
            notes.append(f"{span}: NCCL chooses (algo {algo}, proto {proto}): no row")
            continue
        rows.append(
            ",".join(
                str(v)
                for v in (
                    "allreduce",
                    low,
                    high if high is not None else UNBOUNDED,
                    _PLUGIN_NAMES[algo],
                    _PLUGIN_NAMES[proto],
                    ctas or -1,
                    -1,
                    table.world_size,
                    -1,
                    reg_buff,
                )
            )
        )
    return rows, notes


def _one_node_type(tables: list[Table], fmt: str) -> None:
    keys = sorted({t.hardware_key for t in tables})
    if len(keys) > 1:
        raise ExportError(
            f"{fmt}: the file has tables for {', '.join(keys)}; NCCL's settings "
            "are per node type: export from a file of one hardware key"
        )


def format_nccl_tuner(
    thresholds: Thresholds,
    source: str,
    dtype: str | None = None,
    mode: str | None = None,
    world_size: int | None = None,
) -> str:
    tables = pick_tables(thresholds, "nccl-tuner", dtype, mode, world_size)
    _one_node_type(tables, "nccl-tuner")
    by_ws: dict[int, dict[str, tuple[list[str], list[str]]]] = {}
    for table in tables:
        by_ws.setdefault(table.world_size, {})[table.mode] = tuner_rows(
            table, 1 if table.mode == "graph" else 0
        )
    lines = [
        f"# tuner export --format nccl-tuner {source}  ({tables[0].hardware_key}, "
        f"{tables[0].dtype})",
        "# NCCL_TUNER_PLUGIN=<libnccl-tuner-example.so> NCCL_TUNER_CONFIG_FILE=<this file>",
        "# collective,min_bytes,max_bytes,algorithm,protocol,channels,nNodes,nRanks,"
        "numPipeOps,regBuff",
        "# regBuff 1: CUDA-graph calls (registered buffers, NCCL_GRAPH_REGISTER=1), 0: eager",
        "# the stock example plugin runs uncovered sizes and channels -1 on ONE channel:",
        "# patch its default to 0 (as RCCL did) or give every size a row with channels",
    ]
    for ws, modes in sorted(by_ws.items()):
        bare = {mode: [r.rsplit(",", 1)[0] for r in rows] for mode, (rows, _) in modes.items()}
        if len(modes) == 2 and bare["graph"] == bare["eager"]:  # one set of rows, any regBuff
            modes = {"graph and eager": ([r + ",-1" for r in bare["graph"]], modes["graph"][1])}
        for mode, (rows, notes) in sorted(modes.items()):
            lines.append(f"# world size {ws}, {mode}")
            lines += rows + [f"# {note}" for note in notes]
    return "\n".join(lines) + "\n"


def format_nccl_env(
    thresholds: Thresholds,
    source: str,
    dtype: str | None = None,
    mode: str | None = None,
    world_size: int | None = None,
) -> str:
    tables = pick_tables(thresholds, "nccl-env", dtype, mode, world_size)
    _one_node_type(tables, "nccl-env")
    settings = set()
    for table in tables:
        where = f"nccl-env: {table.hardware_key} ws{table.world_size} {table.mode}"
        settings |= {_knobs(r, where) for _, _, r in spans(table) if r.algorithm in NCCL}
    if len(settings) > 1:
        raise ExportError(
            "nccl-env: the NCCL rules differ by size or table ("
            + "; ".join(f"{a}/{p}/ctas {c}" for a, p, c in sorted(settings))
            + "), and the variables are "
            "process-wide: use --format nccl-tuner"
        )
    lines = [
        f"# tuner export --format nccl-env {source}  ({tables[0].hardware_key}, {tables[0].dtype})"
    ]
    if not settings:
        return "\n".join(lines + ["# no NCCL rule in these tables"]) + "\n"
    algo, proto, ctas = settings.pop()
    if algo != "default":
        lines.append(f"export NCCL_ALGO=allreduce:{_ENV_NAMES[algo]}")
    if proto != "default":
        lines.append(f"export NCCL_PROTO=allreduce:{_ENV_NAMES[proto]}")
    if ctas:
        lines += [f"export NCCL_MIN_CTAS={ctas}", f"export NCCL_MAX_CTAS={ctas}"]
    if len(lines) == 1:
        lines.append("# NCCL's own choice everywhere: nothing to set")
    return "\n".join(lines) + "\n"
