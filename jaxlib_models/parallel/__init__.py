"""Parallel layouts, gradient communicators, DiLoCo and multi-host launch."""
