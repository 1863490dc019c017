"""The front door of riskwatch: settings, the wire contract, the Faust app, the CLI and local Kafka."""

__all__: list[str] = []
