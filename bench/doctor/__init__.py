"""`bench doctor`: what this node offers, and why a backend cannot run here."""

__all__ = ["checks"]
