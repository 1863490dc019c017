"""The terminal live view: one coloured, readable line per warning read from risk.alerts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from app.faust_app import ALERTS
from app.settings import get_settings
from models.schemas import LEVELS

_COLOURS = {"low": "\033[37m", "medium": "\033[33m", "high": "\033[91m", "critical": "\033[97;41m"}
_RESET = "\033[0m"


def format_alert(alert: dict[str, Any], colour: bool = True) -> str:
    """Render a warning as `HH:MM:SS LEVEL category entity: first reason (+n more)`."""
    level = alert.get("level", "?")
    reasons = alert.get("reasons") or []
    first = reasons[0]["message"] if reasons else ""
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    n = len(alert.get("event_ids") or [])
    events = f" [{n} events]" if n > 1 else ""
    ts = str(alert.get("event_ts", ""))[11:19]
    tag = f"{level.upper():8}"
    if colour:
        tag = f"{_COLOURS.get(level, '')}{tag}{_RESET}"
    return (f"{ts} {tag} {alert.get('category', '?'):17} {alert.get('entity_type', '')}:{alert.get('entity_id', '')}"
            f"  {first}{more}{events}  score={float(alert.get('score', 0)):.3f}")


def follow(from_beginning: bool = False, until: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Yield warnings from the alerts topic as they arrive (updates too); stop when `until()` turns true."""
    from app.admin import consumer

    s = get_settings()
    c = consumer(s, s.topic(ALERTS), auto_offset_reset="earliest" if from_beginning else "latest")
    try:
        while until is None or not until():
            for records in c.poll(timeout_ms=500).values():
                for msg in records:
                    try:
                        yield json.loads(msg.value)
                    except ValueError:
                        continue
    finally:
        c.close()


def tail(from_beginning: bool = False, min_level: str = "low", out: TextIO = sys.stdout) -> None:
    """Print warnings at or above `min_level` until interrupted."""
    floor = LEVELS.index(min_level)
    colour = out.isatty()
    for alert in follow(from_beginning):
        if LEVELS.index(alert.get("level", "low")) >= floor:
            print(format_alert(alert, colour), file=out, flush=True)


__all__ = ["follow", "format_alert", "tail"]
