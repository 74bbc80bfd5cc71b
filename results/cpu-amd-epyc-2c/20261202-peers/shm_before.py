"""The shm backends as they were before issue 15 (commit 93d401c), registered beside today's as
`shm_before_one_shot` and `shm_before_two_shot`, so that one sweep measures both.

The source is read from git (`git show 93d401c:bench/backends/shm.py`) and run under the new
names; it uses today's `shm_segment`, whose FlagBarrier with its default `yield_s=0` waits as it
did then (spin, then futex sleep). Load it with
`PYTHONPATH=<this folder> ALLREDUCE_AUTOTUNE_PLUGINS=shm_before`.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

BASE = "93d401c"
REPO = Path(__file__).resolve().parents[3]


def _load() -> None:
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASE}:bench/backends/shm.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for algorithm in ("one_shot", "two_shot"):
        source = source.replace(f'name="shm_{algorithm}"', f'name="shm_before_{algorithm}"')
    module = types.ModuleType("shm_before_code")
    module.__file__ = f"{BASE}:bench/backends/shm.py"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)


_load()
