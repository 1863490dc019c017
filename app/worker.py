"""Assemble and run the riskwatch worker: topics, agents, rule control and the metrics endpoint."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from agents import control, disclosure, feedback, health, market, platform, transactions, web
from agents.sink import Sink
from app.admin import ensure_topics
from app.faust_app import Runtime, create_app
from app.metrics import Metrics
from app.settings import Settings, get_settings
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


def run(settings: Settings | None = None) -> None:
    """Create topics, serve /metrics and run the worker until it is stopped."""
    import faust

    s = settings or get_settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    created = ensure_topics(s)
    if created:
        log.info("created topics: %s", ", ".join(created))
    rt = build(s)
    start_http_server(s.metrics_port, addr=s.web_host, registry=rt.metrics.registry)
    log.info("metrics on http://%s:%s/metrics, warnings page on http://%s:%s/", s.web_host, s.metrics_port,
             s.web_host, s.web_port)
    # override_logging=False keeps app.logs' handler (JSON lines when asked) for Faust's own records too.
    worker = faust.Worker(rt.app, loglevel=s.log_level.lower(), quiet=True, override_logging=False)
    worker.spinner = None  # a terminal spinner on stdout would corrupt JSON log lines
    worker.execute_from_commandline()


__all__ = ["build", "run"]
