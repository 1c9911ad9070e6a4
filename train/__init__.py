"""Thin training entry points: `python -m train --config ... --workdir ...`."""
