"""The exceptions riskwatch raises on purpose, one base class and one subclass per area."""

from __future__ import annotations


class RiskwatchError(Exception):
    """Base class for every error riskwatch raises on purpose; messages say what was wrong and what to do."""


class ConfigError(RiskwatchError):
    """Settings, rule catalogues or plan catalogues that cannot be used as given."""


class EventError(RiskwatchError):
    """An input event that does not follow the wire contract."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class KafkaLocalError(RiskwatchError):
    """The local Kafka broker could not be fetched, started or stopped."""


class StateMigrationError(RiskwatchError):
    """State under the names of an earlier version that must be migrated first (app/migration.py), or cannot be."""


__all__ = ["ConfigError", "EventError", "KafkaLocalError", "RiskwatchError", "StateMigrationError"]
