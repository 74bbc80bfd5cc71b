"""`bench doctor` with rank 1 reporting another torch and driver: run as a script, it is the
doctor's own command with its `fingerprint` argument wrapped (the launcher's spawned ranks
re-run this file as their __main__, so the function is found there)."""

from __future__ import annotations

import sys

from bench.doctor import main, rank_fingerprint
from bench.launch.flags import run_command


def rank1_differs(ctx) -> dict:
    fp = rank_fingerprint(ctx)
    if ctx.rank == 1:
        fp.update(torch="0.0.0-other", driver="999.1")
    return fp


if __name__ == "__main__":
    sys.exit(run_command("bench", lambda: main(sys.argv[1:], fingerprint=rank1_differs)))
