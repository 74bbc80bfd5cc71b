"""`bench doctor`: what this node offers, and why a backend cannot run here.

Three parts, each usable when the others fail: the node from this process (`node`); the ranks,
started through the sweep's launcher, their fingerprints compared and every backend probed,
created and checked as a sweep does it (`ranks`); the text report (`format`). `command` is the
subcommand.
"""

from bench.doctor.command import main
from bench.doctor.node import check_rendezvous, node_report
from bench.doctor.ranks import compare_fingerprints, rank_fingerprint

__all__ = ["main", "node_report", "check_rendezvous", "rank_fingerprint", "compare_fingerprints"]
