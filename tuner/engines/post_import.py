"""Run a function when a module is first imported, or at once when it already is.

A plugin that must change a class before its first use, without importing the class's module
(and everything it imports) in processes that never use it: a finder on `sys.meta_path` waits
for the module's name, lets the usual finders find it, and calls the hooks right after the
module's code has run.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["when_imported"]

Hook = Callable[[ModuleType], None]
_lock = threading.Lock()


def when_imported(name: str, hook: Hook) -> None:
    """Call `hook(module)` once `name` is imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _finder().waiting.setdefault(name, []).append(hook)
            return
    hook(module)


def _finder() -> _Waiter:
    for finder in sys.meta_path:
        if isinstance(finder, _Waiter):
            return finder
    finder = _Waiter()
    sys.meta_path.insert(0, finder)
    return finder


class _Waiter(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.waiting: dict[str, list[Hook]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, self.waiting.pop(fullname))
                return spec
        return None


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the hooks."""

    def __init__(self, loader, hooks: list[Hook]) -> None:
        self._loader, self._hooks = loader, hooks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in self._hooks:
            hook(module)

    def __getattr__(self, name: str):  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)
