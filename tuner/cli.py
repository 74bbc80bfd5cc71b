"""`tuner fit | live | show | export` (placeholder until the tuner lands)."""

import sys


def main(argv=None) -> int:
    print("usage: tuner {fit,live,show,export} ...", file=sys.stderr)
    return 2
