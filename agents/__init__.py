"""Faust agents, one stream concern per module: transactions, market ticks, platform aggregates, rule control,
disposal (triggers, lifecycle, escalation), paging, disclosure, health metrics and the risk-ops console (web: page
and API; feed: what it shows; console: sign-in and roles; case: the events behind a warning)."""

__all__: list[str] = []
