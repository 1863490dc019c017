"""`riskwatch check`: everything a worker would refuse at start, and what it depends on, checked without starting one.

A deploy pipeline or an init container asks before the rollout: the worker's own refusals (codecs,
topic names, ports, topics that exist with another partition count or not at all), Kafka reached
with these credentials, the rule and plan catalogues, the console's accounts and Alertmanager. Each
line says what was found, and for a failure what to do; nothing is created or written.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from app.settings import Settings
from models.errors import RiskwatchError

OK, FAIL, NOTE = "ok", "FAIL", "--"


@dataclass(frozen=True)
class Finding:
    """One line of the check: its outcome (ok, FAIL, or -- for something off but not required) and what it says."""

    outcome: str
    subject: str
    text: str

    def line(self) -> str:
        """The finding as printed: outcome, subject, text."""
        return f"{self.outcome:<5}{self.subject}: {self.text}"


def _run(subject: str, check: Callable[[], str | None], says: str = "") -> Finding:
    """A check that raises RiskwatchError to fail; what it returns (else `says`) is what an ok line says."""
    try:
        found = check()
    except RiskwatchError as exc:
        return Finding(FAIL, subject, str(exc))
    return Finding(OK, subject, found or says)


def check(s: Settings, kafka_timeout: float = 15.0, alertmanager_timeout: float = 5.0) -> list[Finding]:
    """Every check, in the order the worker meets them; Kafka's topic checks only when Kafka answers."""
    from app.admin import admin, refuse_if_topics_unfit
    from app.faust_app import ALL_TOPICS, MARKET, TRANSACTIONS
    from app.worker import refuse_if_codecs_missing, refuse_if_taken, refuse_if_topic_names_clash
    from models.plans import load_plans
    from models.rules import load_catalogue

    def ports() -> None:
        refuse_if_taken(s.web_host, s.metrics_port, "RISKWATCH_METRICS_PORT")
        refuse_if_taken(s.web_host, s.web_port, "RISKWATCH_WEB_PORT")

    out = [
        _run("codecs", refuse_if_codecs_missing, "gzip, snappy, lz4 and zstd input can be read"),
        _run("topic names", lambda: refuse_if_topic_names_clash(s),
             f"{s.topic(TRANSACTIONS)}, {s.topic(MARKET)}, ... (prefix {s.topic_prefix or 'none'})"),
        _run("ports", ports, f"{s.web_host}:{s.metrics_port} (metrics) and :{s.web_port} (web) are free"),
        _run("rules", lambda: f"{s.rules_file}: version {(c := load_catalogue(s.rules_file)).version}, "
                              f"{len(c.rules)} rules"),
        _run("plans", lambda: f"{s.plans_file}: version {(p := load_plans(s.plans_file)).version}, "
                              f"{len(p.plans)} plans"),
    ]
    existing: set[str] | None = None

    def kafka() -> str:
        nonlocal existing
        client = admin(s, timeout=kafka_timeout)
        try:
            existing = set(client.list_topics())
        finally:
            client.close()
        return f"{s.kafka_bootstrap} answers ({s.kafka_security_protocol})"

    out.append(_run("kafka", kafka))
    if existing is not None:
        def topics() -> str:
            refuse_if_topics_unfit(s)
            missing = [s.topic(t) for t in ALL_TOPICS if s.topic(t) not in (existing or set())]
            return (f"{len(ALL_TOPICS) - len(missing)} of {len(ALL_TOPICS)} exist"
                    + (f"; the worker creates {', '.join(missing)}" if missing else ""))

        out.append(_run("topics", topics))
    out.append(_users(s))
    out.append(_alertmanager(s, alertmanager_timeout))
    return out


def _users(s: Settings) -> Finding:
    from app.auth import Users

    try:
        n = len(Users(s.users_path).users)
    except RiskwatchError as exc:
        return Finding(FAIL, "console", str(exc))
    if n:
        return Finding(OK, "console", f"{n} account{'s' if n > 1 else ''} in {s.users_path}")
    return Finding(NOTE, "console", f"no accounts in {s.users_path}: the console shows only a sign-in notice; "
                                    "create one with `riskwatch users add NAME --role operator`")


def _alertmanager(s: Settings, timeout: float) -> Finding:
    if not s.alertmanager_url:
        return Finding(NOTE, "paging", "RISKWATCH_ALERTMANAGER_URL is empty: no warning is paged")
    url = s.alertmanager_url.rstrip("/") + "/-/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Finding(FAIL, "paging", f"cannot reach Alertmanager at {s.alertmanager_url} ({reason}): start it or "
                                       "fix RISKWATCH_ALERTMANAGER_URL")
    if status != 200:
        return Finding(FAIL, "paging", f"Alertmanager at {s.alertmanager_url} is not ready (HTTP {status} from "
                                       "/-/ready)")
    return Finding(OK, "paging", f"Alertmanager at {s.alertmanager_url} is ready; pages from level "
                                 f"{s.page_min_level}")


__all__ = ["FAIL", "NOTE", "OK", "Finding", "check"]
