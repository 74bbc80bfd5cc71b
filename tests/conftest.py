"""Shared fixtures: run the CLIs as a user does, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra or {})
    return env


@pytest.fixture
def run_cli():
    """run_cli("bench", "sweep", ...) -> CompletedProcess (text, captured)."""

    def _run(
        program: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 240,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        module = {"bench": "bench.cli", "tuner": "tuner.cli"}[program]
        return subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(env),
            cwd=cwd or REPO,
        )

    return _run


@pytest.fixture
def subprocess_env():
    return _env
