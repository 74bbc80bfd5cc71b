"""Backend registry: each family module registers its algorithms by name at import.

Family modules are imported lazily on first use; a family whose import fails (say Triton is
missing) registers nothing and its names are reported as unavailable with the import error.
Third-party communicators register through the entry-point group
``allreduce_autotune.backends`` (each entry point is a module to import), or, without
packaging, by naming modules in ``ALLREDUCE_AUTOTUNE_PLUGINS`` (comma separated).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from bench.backends.base import (
    Backend,
    BackendSpec,
    CommContext,
    WritesElsewhere,
    make_gate,
    params_key,
)
from bench.environment import get

__all__ = [
    "Backend",
    "BackendSpec",
    "CommContext",
    "WritesElsewhere",
    "make_gate",
    "register",
    "get_spec",
    "all_specs",
    "known_names",
    "family_errors",
    "floor_name",
    "needs_buffer",
    "params_key",
    "reasons_here",
    "device_reason",
]

# family module -> the names it registers (known up front so that `--backends` can be
# validated and a failed import can still be reported per name)
FAMILIES: dict[str, tuple[str, ...]] = {
    "gloo": ("gloo",),
    "shm": ("shm_one_shot", "shm_two_shot"),
    "nccl": ("nccl",),
    "pynccl": ("pynccl", "pynccl_symm"),
    "symm_mem": ("symm_mem_one_shot", "symm_mem_two_shot", "symm_mem_multimem"),
    "custom": ("custom_one_shot", "custom_two_shot"),
}
PLUGIN_GROUP = "allreduce_autotune.backends"

_REGISTRY: dict[str, BackendSpec] = {}
_FAMILY_ERRORS: dict[str, str] = {}
_LOADED = False


def register(spec: BackendSpec) -> BackendSpec:
    """Register (or replace) a backend spec by name."""
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for family in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except Exception as exc:  # a family that cannot import is a reason, not a crash
            _FAMILY_ERRORS[family] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        plugins = entry_points(group=PLUGIN_GROUP)
    except Exception:
        plugins = ()
    for ep in plugins:
        try:
            ep.load()
        except Exception as exc:
            _FAMILY_ERRORS[f"plugin:{ep.name}"] = f"{type(exc).__name__}: {exc}"
    for module in filter(None, (get("ALLREDUCE_AUTOTUNE_PLUGINS") or "").split(",")):
        try:
            importlib.import_module(module.strip())
        except Exception as exc:
            _FAMILY_ERRORS[f"plugin:{module}"] = f"{type(exc).__name__}: {exc}"


def all_specs() -> list[BackendSpec]:
    """Every registered spec, in registration order (the family order above)."""
    _load()
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackendSpec:
    _load()
    if name not in _REGISTRY:
        for family, names in FAMILIES.items():
            if name in names and family in _FAMILY_ERRORS:
                raise KeyError(f"backend {name!r} unavailable: {_FAMILY_ERRORS[family]}")
        raise KeyError(f"unknown backend {name!r} (known: {', '.join(known_names())})")
    return _REGISTRY[name]


def known_names() -> list[str]:
    """Every name a user may pass to --backends, registered or not importable here."""
    _load()
    names = [n for family in FAMILIES.values() for n in family]
    names += [n for n in _REGISTRY if n not in names]
    return names


def family_errors() -> dict[str, str]:
    _load()
    return dict(_FAMILY_ERRORS)


def floor_name(device_type: str) -> str:
    """The backend that always works on `device_type` ("cpu" or "cuda"): the spec marked
    `is_floor` (gloo, nccl)."""
    for spec in all_specs():
        if spec.is_floor and spec.device == device_type:
            return spec.name
    raise KeyError(f"no floor backend registered for {device_type!r}")


def needs_buffer(name: str) -> bool:
    """Whether `name` holds a buffer of its max_size (True for a name whose family does not
    import here: the safe side of a memory budget)."""
    _load()
    spec = _REGISTRY.get(name)
    return True if spec is None else spec.needs_buffer


def reasons_here(ctx: CommContext) -> dict[str, str | None]:
    """Every known name -> None where it can run in `ctx`, else why not (a family that does not
    import here: its error). Probes check local facts only, so `bench sweep` asks this before
    any rank starts, with a stand-in context, to pick the backends this machine can run. A
    backend of the other device gets one shared reason, so a summary can group them."""
    reasons: dict[str, str | None] = {}
    for name in known_names():
        try:
            spec = get_spec(name)
        except KeyError as exc:
            reasons[name] = str(exc.args[0])
            continue
        reason = device_reason(spec, ctx.device.type)
        if reason is None:
            try:
                reason = spec.probe(ctx)
            except Exception as exc:  # a probe that fails is a reason, as at the sweep
                reason = f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0]
        reasons[name] = reason
    return reasons


def device_reason(spec: BackendSpec, device_type: str) -> str | None:
    """Why `spec` cannot serve ranks on `device_type` ("cpu" or "cuda"), or None: one text
    for every backend of the other device, so that a summary can group them."""
    if spec.device == device_type:
        return None
    hint = "--device cuda on a GPU node" if spec.device == "cuda" else "--device cpu"
    return f"needs {spec.device} tensors; these ranks run on {device_type} ({hint})"
