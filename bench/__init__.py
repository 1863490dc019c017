"""End-to-end benchmarks: ceilings, baselines and riskwatch itself, through the real broker (`python -m bench`)."""

from __future__ import annotations

from bench.common import Figure, Report

__all__ = ["Figure", "Report"]
