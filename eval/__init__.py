"""Thin evaluation entry points and reports: `python -m eval ...`."""
