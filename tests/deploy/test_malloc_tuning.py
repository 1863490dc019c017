"""The worker's glibc tuning is really applied where glibc is the C library (Debian, the images)."""

from __future__ import annotations

import platform
import sys

import pytest

from app.faust_app import tune_malloc


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_mallopt_accepts_both_thresholds() -> None:
    # mallopt returns 0 for an unknown parameter or a refused value: a wrong constant shows here.
    assert tune_malloc() is True
