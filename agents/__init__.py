"""Faust agents, one stream concern per module: transactions, market ticks, platform aggregates, rule control,
disposal (triggers, lifecycle, escalation), paging, disclosure, health metrics and the warnings page."""

__all__: list[str] = []
