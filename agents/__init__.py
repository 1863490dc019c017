"""Faust agents, one stream concern per module: transactions, market ticks, platform aggregates, rule control."""

__all__: list[str] = []
