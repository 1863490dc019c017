"""The wire contract and everything that scores, free of Kafka and Faust: features, detector, rules, monitors."""

__all__: list[str] = []
