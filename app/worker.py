"""Assemble and run the riskwatch worker: topics, agents, rule control and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from prometheus_client import start_http_server

from agents import control, disclosure, feedback, health, lists, market, platform, transactions, web
from agents.sink import Sink
from app.admin import ensure_topics, refuse_if_topics_unfit
from app.faust_app import ALL_TOPICS, Runtime, create_app, missing_codecs
from app.logs import flush_logging
from app.metrics import Metrics
from app.settings import Settings, get_settings
from models.errors import ConfigError
from models.lists import ListIndex
from models.rules import Catalogue, load_catalogue
from models.scoring import TransactionScorer

log = logging.getLogger("riskwatch.worker")


def build(settings: Settings | None = None, metrics: Metrics | None = None) -> Runtime:
    """Create the app with every agent attached, the rule catalogue loaded from settings."""
    s = settings or get_settings()
    rt = create_app(s, metrics)
    catalogue = load_catalogue(s.rules_file)
    sink = Sink(rt)
    scorer = TransactionScorer(catalogue, storm_cap=s.storm_cap_per_minute)
    # The transaction engine also feeds disclosure stage 1: one reader and one decode per message.
    disclosed = disclosure.attach(rt, sink)
    transactions.attach(rt, sink, scorer, disclosed)
    market_agent = market.attach(rt, sink, catalogue)
    monitors = platform.attach(rt, sink, catalogue)

    def apply(cat: Catalogue) -> None:
        scorer.set_catalogue(cat)
        market_agent.set_catalogue(cat)
        monitors.set_catalogue(cat)

    control.attach(rt, control.RuleControl(rt, sink, catalogue, apply))
    # Block, watch and allow lists analysts change at run time (risk.lists), consulted by the scorer.
    index = ListIndex()
    scorer.set_lists(index)
    list_follower = lists.ListFollower(rt, sink, index)
    lists.attach(rt, list_follower)
    rt.extras["lists"] = list_follower
    lists.install_admin(rt, index)
    # Analysts' verdicts (risk.feedback, written by the disposal agent) move the scorer's operating points.
    follower = feedback.FeedbackFollower(rt, scorer)
    feedback.attach(rt, follower)
    rt.extras["feedback"] = follower
    health.attach(rt, catalogue, sink)
    web.attach(rt)
    _attach_disposal(rt, sink, s, disclosed, follower)
    rt.extras["sink"] = sink
    return rt


def _attach_disposal(rt: Runtime, sink: Sink, s: Settings, disclosed: disclosure.Disclosure,
                     follower: feedback.FeedbackFollower) -> None:
    # Disposal and supervision (contingency plans, acks, escalation, paging): agents/disposal.py.
    from agents import disposal, pager
    from models.plans import load_plans

    disposer = disposal.attach(rt, sink, load_plans(s.plans_file), disclosed, follower)
    rt.extras["disposal"] = disposer
    pager.attach(rt, disposer)


EXIT_FORCED = 1  # the exit status when the shutdown watchdog ended the process


class ShutdownWatchdog:
    """Ends the process `seconds` after a stop signal if the orderly stop has not ended it by then.

    A thread, not a task: what hangs may be the event loop itself (a close that never returns, a
    blocking call). Before exiting it says what was not committed (`last_words`) and that it gave up.
    """

    def __init__(self, seconds: float, last_words: Callable[[], None] | None = None,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.seconds = seconds
        self.last_words = last_words
        self._exit = exit
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        """Start counting."""
        self._timer.start()

    def _fire(self) -> None:
        try:
            if self.last_words is not None:
                self.last_words()
        except Exception:  # nothing may keep the process from exiting now
            log.exception("reporting the uncommitted offsets failed")
        log.error("shutdown did not finish within %.0f s (RISKWATCH_SHUTDOWN_TIMEOUT); exiting now with status %d",
                  self.seconds, EXIT_FORCED)
        flush_logging()
        self._exit(EXIT_FORCED)


class Worker(faust.Worker):  # type: ignore[misc]
    """Faust's worker with a bounded stop: on SIGTERM or SIGINT, exit within RISKWATCH_SHUTDOWN_TIMEOUT.

    With the broker gone, Faust's stop and the clients' closes each waited for it: 92 s and 11,000
    log lines (issue 17). On the first signal a watchdog starts (ShutdownWatchdog), then
    `stop_first` (the transaction engine: stop consuming, flush, commit, report what was not
    committed) runs before Faust's own stop. Hooks mode's `_schedule_shutdown` and `_stop_on_signal`
    (mode-streaming 0.7, under faust-streaming 0.15); tests/faults/test_shutdown.py checks both.
    """

    def __init__(self, app: faust.App, *, shutdown_timeout: float,
                 stop_first: Callable[[], Awaitable[None]] | None = None,
                 last_words: Callable[[], None] | None = None, **kw: Any) -> None:
        super().__init__(app, **kw)
        self.shutdown_timeout = shutdown_timeout
        self.stop_first = stop_first
        self.watchdog = ShutdownWatchdog(shutdown_timeout, last_words)

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        if not self._signal_stop_time:  # the first signal only, as mode's own
            log.info("%s: stopping; exiting within %.0f s whatever the broker's state", sig.name,
                     self.shutdown_timeout)
            self.watchdog.start()
        super()._schedule_shutdown(sig)

    async def _stop_on_signal(self, sig: signal.Signals) -> None:
        if self.stop_first is not None:
            try:
                await self.stop_first()
            except asyncio.CancelledError:
                raise
            except Exception:  # Faust's stop must still run
                log.exception("stopping the transaction engine failed")
        await super()._stop_on_signal(sig)


def refuse_if_taken(host: str, port: int, variable: str) -> None:
    """Raise ConfigError naming `variable` when `port` cannot be bound on `host` (another worker has it, say)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As the servers bind: a port another process listens on is refused, one in TIME_WAIT is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another worker on this "
                              f"machine may have it; set {variable} to a free port") from None


def refuse_if_codecs_missing() -> None:
    """Raise ConfigError when a Kafka compression codec cannot be read here (an install without our dependencies).

    A producer picks its codec; the first batch of snappy, lz4 or zstd records would stop the engine
    in a retry loop, so a worker that could not read them does not start.
    """
    missing = missing_codecs()
    if missing:
        raise ConfigError(f"the Kafka clients here cannot read records compressed with {', '.join(missing)}, "
                          "which producers may send: install riskwatch with its dependencies "
                          "(cramjam, python-snappy, lz4, zstandard)")


def refuse_if_topic_names_clash(s: Settings) -> None:
    """Raise ConfigError when RISKWATCH_TOPIC_NAMES names a topic riskwatch has not, or gives two topics one name."""
    unknown = sorted(set(s.topic_names) - set(ALL_TOPICS))
    if unknown:
        raise ConfigError(f"RISKWATCH_TOPIC_NAMES names {', '.join(unknown)}, which riskwatch does not use; its "
                          f"topics are {', '.join(ALL_TOPICS)}")
    full: dict[str, str] = {}
    for logical in ALL_TOPICS:
        other = full.setdefault(s.topic(logical), logical)
        if other != logical:
            raise ConfigError(f"{other} and {logical} would both be the topic {s.topic(logical)}: give them "
                              "different names in RISKWATCH_TOPIC_NAMES (or RISKWATCH_TOPIC_PREFIX)")


def run(settings: Settings | None = None) -> None:
    """Create topics, serve /metrics and run the worker until it is stopped."""
    s = settings or get_settings()
    # Said before anything else is done: a taken port used to end the worker with a traceback (metrics)
    # or after joining the group (web).
    refuse_if_taken(s.web_host, s.metrics_port, "RISKWATCH_METRICS_PORT")
    refuse_if_taken(s.web_host, s.web_port, "RISKWATCH_WEB_PORT")
    refuse_if_codecs_missing()
    refuse_if_topic_names_clash(s)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    refuse_if_topics_unfit(s)  # before creating anything with a count that would not fit
    created = ensure_topics(s)
    if created:
        log.info("created topics: %s", ", ".join(created))
    rt = build(s)
    start_http_server(s.metrics_port, addr=s.web_host, registry=rt.metrics.registry)
    log.info("metrics on http://%s:%s/metrics, warnings page on http://%s:%s/", s.web_host, s.metrics_port,
             s.web_host, s.web_port)
    engine: transactions.TransactionEngine = rt.extras["transactions"]
    # override_logging=False keeps app.logs' handler (JSON lines when asked) for Faust's own records too.
    worker = Worker(rt.app, shutdown_timeout=s.shutdown_timeout, stop_first=engine.stop,
                    last_words=engine.report_uncommitted, loglevel=s.log_level.lower(), quiet=True,
                    override_logging=False)
    worker.spinner = None  # a terminal spinner on stdout would corrupt JSON log lines
    try:
        worker.execute_from_commandline()
    finally:
        flush_logging()  # the last window's repeat counts


__all__ = ["EXIT_FORCED", "ShutdownWatchdog", "Worker", "build", "refuse_if_codecs_missing", "refuse_if_taken",
           "refuse_if_topic_names_clash", "run"]
