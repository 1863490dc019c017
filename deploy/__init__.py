"""The shipped configuration, found the same way in a checkout and in an installed wheel.

`deploy/` is the folder operators edit (catalogues, Kafka, Prometheus, Alertmanager, Grafana,
Kubernetes) and, installed, the package that carries the defaults the code reads at run time.
Code asks for a file by its path inside this folder (`resource("kafka/pom.xml")`) and never
builds a path from its own `__file__`: in a wheel the checkout is not there. This module
imports nothing of riskwatch, so every layer may use it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource(name: str) -> Path:
    """The shipped file `name` (a path relative to deploy/, e.g. "rules.yaml") on disk."""
    found = files(__name__).joinpath(name)
    # A real path because callers hand it to other programs (mvn -f, log4j's configurationFile) and
    # to settings that operators override with their own path. A wheel installed by pip is on disk;
    # a zip import is not supported.
    if not isinstance(found, Path):
        raise FileNotFoundError(f"riskwatch's {name} is not on disk ({found}); install riskwatch as a wheel, not a zip")
    if not found.is_file():
        raise FileNotFoundError(f"riskwatch's shipped {name} is missing at {found}; reinstall riskwatch")
    return found


__all__ = ["resource"]
