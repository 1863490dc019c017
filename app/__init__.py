"""The front door of riskwatch: settings, the Faust app, the CLI and local Kafka (the contract is models.schemas)."""

__all__: list[str] = []
