"""The house rules, read from the source with `ast` (every import, function-level ones too):
no import circles among the modules of bench/ and tuner/; bench/ never imports tuner/; nobody
reaches into another module's private names (`from X import _y`, `X._y`, `import X._y`),
tests and scripts included; no module of bench/ or tuner/ over 500 lines (as `ruff format`
lays them out; the limit was 400 lines in the denser layout before it);
the environment read in bench/environment.py only; no citation of a document that is not in
the repository; a function-level import of the project's own modules only with a reason
(`# optional:` a heavy or optional dependency kept out of a light module, `# cycle:`), and the
light modules checked by importing them.

The checks run per room (bench/launch, tuner/search, tests, ...), so a failure names the room
it is in, and each lists every offender it finds, not the first."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "tuner")
MAX_LINES = 500
# private by name, public by documentation or by decision
ALLOWED_PRIVATE = (
    "os._exit",  # the documented way to end a process without cleanup
    "torch.distributed._symmetric_memory",  # torch's own symmetric-memory API lives there
    # the argument type of that API's multicast probe (has_multicast_support)
    "torch._C._autograd.DeviceType",
    # POSIX shm without multiprocessing's resource tracker, which unlinks segments at the
    # first process's exit on Python < 3.13 (shm_segment.py says more)
    "_posixshmem",
    # torch's documented way to count graph breaks (there is no torch.compiler equivalent)
    "torch._dynamo.explain",
    # Triton 3.6's interpreter vs numpy >= 2.3, patched for the interpreter-mode kernel tests
    "triton.runtime.interpreter._patch_lang_tensor",
)


@functools.cache
def _sources() -> dict[Path, ast.Module]:
    skip = {".venv", ".git", "build", "node_modules"}
    files = [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]
    return {p.relative_to(REPO): ast.parse(p.read_text(), str(p)) for p in sorted(files)}


def _module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(path: Path) -> str:
    """bench/launch for bench/launch/config.py; bench for bench/cli.py; tests; scripts; ..."""
    if path.parts[0] in PACKAGES:
        return "/".join(path.parts[:2]) if len(path.parts) > 2 else path.parts[0]
    return path.parts[0] if len(path.parts) > 1 else "."


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _sources() if p.parts[0] in PACKAGES}


def _imports(path: Path) -> list[tuple[int, str, str | None, str]]:
    """(line, module, name imported from it or None, the local name bound) for every import in
    the file; relative imports resolved."""
    package = (
        _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    )
    found = []
    for node in ast.walk(_sources()[path]):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0])
                for alias in node.names
            ]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [
                (node.lineno, base, alias.name, alias.asname or alias.name) for alias in node.names
            ]
    return found


def _graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` is mod)."""
    modules = _project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for _, base, name, _local in _imports(path):
            full = f"{base}.{name}" if name else base
            target = resolve(full) if full in modules else resolve(base)
            if target and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _reach_ins(path: Path) -> list[str]:
    """Every use of another module's private name in the file, as `file:line: dotted.name`."""
    here = _module_name(path)
    modules = _project_modules()
    bound: dict[str, str] = {}  # local name -> the dotted name it stands for
    used: list[tuple[int, str]] = []
    for line, base, name, local in _imports(path):
        dotted = f"{base}.{name}" if name else base
        used.append((line, dotted))
        # `import a.b` binds a; `import a.b as c` binds c to a.b
        bound[local] = dotted if name or local != base.split(".")[0] else local
    for node in ast.walk(_sources()[path]):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                used.append((node.lineno, ".".join([bound[base.id], *reversed(chain)])))
    found = []
    for line, dotted in used:
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not _private(part):
                continue
            owner = ".".join(parts[: i + 1])
            # a private module is its own package's to use (Optuna's `_imports` style)
            inside = owner in modules and (
                here == owner
                or here.startswith(owner + ".")
                or here.startswith(".".join(parts[:i]) + ".")
            )
            if not inside and not any(
                dotted == a or dotted.startswith(a + ".") for a in ALLOWED_PRIVATE
            ):
                found.append(f"{path}:{line}: {dotted}")
            break
    return found


def _rooms(only_packages: bool) -> list[str]:
    return sorted({_room(p) for p in _sources() if not only_packages or p.parts[0] in PACKAGES})


@pytest.mark.parametrize("area", PACKAGES)
def test_no_import_circles(area):
    circles = [c for c in _cycles(_graph()) if any(m.split(".")[0] == area for m in c)]
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_bench_never_imports_tuner():
    """The measuring rooms never import the deciding side. The analysis room reads both sides
    (a figure of a run next to the rules of its thresholds.json), through the runtime's own
    schema and rule lookup only: never the search or the table builder."""
    edges = [
        f"{module} -> {target}"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if module.startswith("bench")
        and target.startswith("tuner")
        and not (module.startswith("bench.analysis") and target.startswith("tuner.runtime"))
    ]
    assert not edges, "bench/ imports tuner/: " + "; ".join(edges)


@pytest.mark.parametrize("room", _rooms(only_packages=False))
def test_no_reach_into_private_names(room):
    found = [hit for path in _sources() if _room(path) == room for hit in _reach_ins(path)]
    assert not found, "private names of another module:\n" + "\n".join(found)


@pytest.mark.parametrize("room", _rooms(only_packages=True))
def test_no_module_over_max_lines(room):
    long = [
        f"{p}: {n} lines"
        for p in _sources()
        if _room(p) == room
        for n in [len((REPO / p).read_text().splitlines())]
        if n > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines: " + "; ".join(long)


def test_the_checks_see_a_circle_and_a_reach_in():
    """The checker itself: a circle of three and a private import are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _private("_make_context") and not _private("__init__") and not _private("launch")


# reads of os.environ allowed outside bench/environment.py: saving a value to restore it
ENV_READ_ALLOWED = {Path("bench/backends/base.py")}  # scoped_env saves what it sets
_ENV_WRITES = ("setdefault", "pop", "update")


def _environ_reads(path: Path) -> list[str]:
    """`file:line` of every reading of the process environment: `os.getenv`, `os.environ`
    read, tested or passed on (writes for another library, `os.environ[k] = v`,
    `setdefault`, `pop`, `update`, are not readings)."""
    tree = _sources()[path]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if node.value.id != "os" or node.attr not in ("environ", "getenv"):
            continue
        parent = parents.get(node)
        write = node.attr == "environ" and (
            (isinstance(parent, ast.Subscript) and not isinstance(parent.ctx, ast.Load))
            or (isinstance(parent, ast.Attribute) and parent.attr in _ENV_WRITES)
        )
        if not write:
            found.append(f"{path}:{node.lineno}")
    return found


def _environment_names(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every literal name passed to bench.environment.get in the file."""
    return [
        (node.lineno, node.args[0].value)
        for node in ast.walk(_sources()[path])
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and any(
            base == "bench.environment" and name == "get" for _, base, name, _ in _imports(path)
        )
    ]


@pytest.mark.parametrize("room", _rooms(only_packages=True))
def test_environment_is_read_in_one_module(room):
    """bench.environment lists every variable and is the one place that reads them."""
    from bench import environment

    paths = [p for p in _sources() if _room(p) == room and p != Path("bench/environment.py")]
    reads = [hit for p in paths if p not in ENV_READ_ALLOWED for hit in _environ_reads(p)]
    assert not reads, "os.environ read outside bench/environment.py: " + "; ".join(reads)
    unlisted = [
        f"{p}:{line}: {name}"
        for p in paths
        for line, name in _environment_names(p)
        if not environment.is_listed(name)
    ]
    assert not unlisted, "variables missing from bench.environment.VARIABLES: " + "; ".join(
        unlisted
    )


def test_the_environment_check_sees_a_read():
    source = "import os\na = os.environ.get('X')\nos.environ['Y'] = '1'\nb = 'Z' in os.environ\n"
    path = Path("bench/_probe_env.py")
    _sources()[path] = ast.parse(source)
    try:
        assert sorted(_environ_reads(path)) == [f"{path}:2", f"{path}:4"]
    finally:
        del _sources()[path]


# documents that live outside the repository (the sessions' shared notes): never cited
OUTSIDE_DOCUMENTS = ("DESIGN.md", "STYLE.md")


def test_no_reference_to_a_document_outside_the_repository():
    files = [
        p
        for pattern in ("*.py", "*.md", "*.sh")
        for p in REPO.rglob(pattern)
        if not {".venv", ".git", "build", "node_modules"} & set(p.relative_to(REPO).parts)
        and p != Path(__file__)
    ]
    cited = [
        f"{p.relative_to(REPO)}:{n}: {name}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        for name in OUTSIDE_DOCUMENTS
        if name in line and not (REPO / name).exists()
    ]
    assert not cited, "references to documents not in the repository:\n" + "\n".join(cited)


# third-party modules a function may import where it needs them (optional dependencies)
OPTIONAL_MODULES = frozenset(
    "optuna pandas matplotlib triton vllm mpi4py deepspeed tqdm nbformat".split()
)
# a function-level import of the project's own modules says why on its line(s)
IMPORT_REASONS = ("# cycle:", "# optional:")


def _function_level_own_imports(path: Path, root: Path = REPO) -> list[str]:
    """`file:line: module` of each import of bench/ or tuner/ inside a function without a
    reason comment on its lines; `path` is read under `root` (the repository by default)."""
    text = (root / path).read_text()
    lines = text.splitlines()
    tree = _sources()[path] if root == REPO else ast.parse(text, str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module or ""]
            else:
                continue
            own = [n for n in names if n == "." or n.split(".")[0] in PACKAGES]
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if own and not any(reason in text for reason in IMPORT_REASONS):
                found.append(f"{path}:{node.lineno}: {own[0]}")
    return sorted(set(found))


@pytest.mark.parametrize("room", _rooms(only_packages=True))
def test_imports_inside_functions_only_for_optional_dependencies_or_a_cycle(room):
    found = [hit for p in _sources() if _room(p) == room for hit in _function_level_own_imports(p)]
    assert not found, "function-level imports of the project's own modules: " + "; ".join(found)


def test_the_import_check_sees_a_function_level_import(tmp_path):
    """The checker itself, on a probe module written in a temporary folder (never into the
    repository, where another test's walk could see it)."""
    source = "def f():\n    from bench import sizes\n    from bench import dtypes  # cycle: x\n"
    path = Path("bench/_probe_imports.py")
    (tmp_path / path).parent.mkdir()
    (tmp_path / path).write_text(source)
    assert _function_level_own_imports(path, tmp_path) == [f"{path}:2: bench"]


# what the `# optional:` imports keep out: importing these modules loads none of the heavy
# third-party packages named (a command's --help, `bench report` without --plots, vLLM's
# plug-in in every process, a notebook's figures)
LIGHT_MODULES = {
    "bench.cli": ("torch", "optuna", "matplotlib", "pandas"),
    "bench.analysis.report": ("torch", "optuna", "matplotlib", "pandas"),
    "bench.analysis.plots": ("torch", "optuna"),
    "bench.run.noise": ("torch", "optuna", "matplotlib", "pandas"),
    "tuner.cli": ("torch", "optuna", "matplotlib", "pandas"),
    "tuner.table.options": ("torch", "optuna", "matplotlib", "pandas"),
    "tuner.engines.vllm_plugin": ("torch", "optuna", "matplotlib", "pandas"),
    "tuner.search.live": ("optuna", "matplotlib", "pandas"),
}


@pytest.mark.parametrize("module", sorted(LIGHT_MODULES))
def test_light_modules_load_no_heavy_dependency(module):
    import subprocess
    import sys

    heavy = LIGHT_MODULES[module]
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"import {module} loads {out.stdout.strip()}"
