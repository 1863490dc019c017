"""Everything that scores, free of Kafka: features, the River detector, rules, market and platform monitors."""

__all__: list[str] = []
