"""Kafka administration with kafka-python: create riskwatch's topics, and plain producer/consumer factories."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiokafka.helpers import create_ssl_context
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaProtocolError, TopicAlreadyExistsError

from app.faust_app import ACKS, ALERTS_BY_ID, ALL_TOPICS, COMPACTED, FEEDBACK, MARKET, SINGLE_PARTITION, TRANSACTIONS
from app.settings import Settings
from models.errors import ConfigError, RiskwatchError

log = logging.getLogger("riskwatch.admin")


def _deliver_then_abort() -> None:
    """Makes kafka-python 3.0's transports hand over the bytes read just before the peer closed."""
    try:
        from kafka.net import transport
    except ImportError:  # kafka-python 2.x reads through kafka.conn, which has no such loop
        return
    tcp = getattr(transport, "KafkaTCPTransport", None)
    if tcp is None or not hasattr(tcp, "_sock_recv") or getattr(tcp, "_riskwatch_patched", False):
        return

    # A broker that refuses SASL credentials sends its verdict and closes at once. When both arrive
    # before one read, kafka-python 3.0.11 and 3.0.12 abort on the close and drop the verdict, so the
    # refusal reads "socket disconnected" and is retried for the whole timeout (tests/kafka/
    # test_sasl_tls.py saw 16-57 s). Upstream dpkp/kafka-python#2886 reworks this path.
    async def _read_from_sock(self: Any) -> None:
        while self._read and not self._closed:
            await self._net.wait_read(self._sock)
            data, err = self._sock_recv()
            if data:
                self.last_read = time.monotonic()
                if self._protocol and self._protocol._sensors:
                    self._protocol._sensors.bytes_received.record(len(data))
                try:
                    self._protocol.data_received(data)
                except KafkaProtocolError as exc:
                    return self.abort(error=exc)
                for _ in range(20):  # the reader of that last response acts on it before the close
                    if not err or self._closed:
                        break
                    await self._net.sleep(0.005)
            if err:
                return self.abort(error=err)

    tcp._read_from_sock = _read_from_sock
    tcp._riskwatch_patched = True


_deliver_then_abort()

# Verdict records (one per alert) are compacted, and dropped after 10 of models.feedback's 14-day
# half-lives, when a verdict weighs 1/1024: at 2,000 verdicts a day the topic stays near 40 MB
# instead of growing by ~110 MB a year.
_DELETE_AFTER = {FEEDBACK: 140 * 86_400_000}


def client_config(s: Settings) -> dict[str, Any]:
    """kafka-python connection settings (bootstrap and security) from riskwatch settings."""
    cfg: dict[str, Any] = {"bootstrap_servers": s.kafka_bootstrap.split(","),
                           "security_protocol": s.kafka_security_protocol}
    if s.kafka_ssl_cafile:
        cfg["ssl_cafile"] = s.kafka_ssl_cafile
    if s.kafka_security_protocol.upper().startswith("SASL"):
        cfg.update(sasl_mechanism=s.kafka_sasl_mechanism or "PLAIN", sasl_plain_username=s.kafka_sasl_username,
                   sasl_plain_password=s.kafka_sasl_password.get_secret_value())
    return cfg


def aiokafka_config(s: Settings) -> dict[str, Any]:
    """aiokafka connection settings (bootstrap and security) from riskwatch settings."""
    cfg: dict[str, Any] = {"bootstrap_servers": s.kafka_bootstrap.split(","),
                           "security_protocol": s.kafka_security_protocol.upper()}
    if cfg["security_protocol"] in ("SSL", "SASL_SSL"):
        cfg["ssl_context"] = create_ssl_context(cafile=s.kafka_ssl_cafile or None)
    if cfg["security_protocol"].startswith("SASL"):
        cfg.update(sasl_mechanism=s.kafka_sasl_mechanism or "PLAIN", sasl_plain_username=s.kafka_sasl_username,
                   sasl_plain_password=s.kafka_sasl_password.get_secret_value())
    return cfg


class _Cause(logging.Handler):
    """Keeps the first connection failure kafka-python logs: its exceptions say only "Unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kind: str | None = None
        self.detail = ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.kind in ("credentials", "certificate"):
            return  # the decisive cause is known; later lines are its consequences
        msg = record.getMessage()
        for kind, marks in _CAUSES:
            if any(m in msg for m in marks):
                self.kind, self.detail = kind, msg.rsplit(": ", 1)[-1] if kind != "certificate" else msg
                return


# What kafka-python logs for each cause, checked in order. A refused password or certificate will not
# change by retrying: those fail at once; an unreachable or not-yet-started broker is retried.
_CAUSES = (
    ("credentials", ("SaslAuthenticationFailed", "Authentication failed")),
    ("certificate", ("CERTIFICATE_VERIFY_FAILED",)),
    ("refused", ("ECONNREFUSED", "Connect call failed", "Name or service not known", "nodename nor servname")),
    ("closed", ("socket disconnected",)),
)


def _explain(s: Settings, cause: _Cause, exc: Exception) -> str:
    where = f"Kafka at {s.kafka_bootstrap}"
    if cause.kind == "credentials":
        return (f"{where} refused the credentials (SASL {s.kafka_sasl_mechanism or 'PLAIN'} as user "
                f"{s.kafka_sasl_username!r}): check RISKWATCH_KAFKA_SASL_USERNAME, RISKWATCH_KAFKA_SASL_PASSWORD "
                "and RISKWATCH_KAFKA_SASL_MECHANISM")
    if cause.kind == "certificate":
        detail = cause.detail.split("certificate verify failed: ", 1)[-1].split(" (_ssl.c", 1)[0]
        return (f"the TLS certificate of {where} was refused ({detail}): the bootstrap host must be a name in "
                "the broker's certificate, and RISKWATCH_KAFKA_SSL_CAFILE the CA that signed it")
    if cause.kind == "closed" and s.kafka_security_protocol.upper() != "SASL_SSL":
        return (f"{where} closed every connection: does its listener expect TLS or SASL? "
                f"RISKWATCH_KAFKA_SECURITY_PROTOCOL is {s.kafka_security_protocol}")
    return (f"cannot reach Kafka at {s.kafka_bootstrap} ({cause.detail or exc}); start one with "
            "'riskwatch kafka start' or set RISKWATCH_KAFKA_BOOTSTRAP")


def admin(s: Settings, timeout: float = 30.0) -> KafkaAdminClient:
    """An admin client, retried until the broker answers or `timeout` passes; the error says why it could not."""
    deadline = time.monotonic() + timeout
    kafka_log = logging.getLogger("kafka")
    # Short bootstraps first (5 s, not kafka-python's 30): a refused password is reported in seconds.
    # Each retry waits twice as long (to 20 s): a cold or loaded broker may need more than 5 s for
    # TLS and SCRAM.
    attempt = 5.0
    while True:
        cause = _Cause()
        # Heard here only: app.logs keeps kafka-python's per-retry lines out of the log (CRITICAL).
        level, propagate = kafka_log.level, kafka_log.propagate
        kafka_log.setLevel(logging.WARNING)
        kafka_log.propagate = False
        kafka_log.addHandler(cause)
        try:
            left = deadline - time.monotonic()
            return KafkaAdminClient(**client_config(s), request_timeout_ms=10_000,
                                    bootstrap_timeout_ms=int(1000 * max(1.0, min(attempt, left))))
        except KafkaError as exc:
            if cause.kind in ("credentials", "certificate") or time.monotonic() > deadline:
                raise RiskwatchError(_explain(s, cause, exc)) from None
            attempt = min(2 * attempt, 20.0)
            time.sleep(0.5)
        finally:
            kafka_log.removeHandler(cause)
            kafka_log.setLevel(level)
            kafka_log.propagate = propagate


def ensure_topics(s: Settings, extra: tuple[str, ...] = ()) -> list[str]:
    """Create riskwatch's topics if missing (partitions from settings); return the names created.

    Not an input topic given by name (topic_names): that is the platform's own (refuse_if_topics_unfit).
    """
    wanted = [(s.topic(name), 1 if name in SINGLE_PARTITION else s.topic_partitions, name in COMPACTED,
               _DELETE_AFTER.get(name)) for name in (*ALL_TOPICS, *extra)
              if name not in s.topic_names or name not in (TRANSACTIONS, MARKET)]
    return _create_missing(s, wanted)


def ensure_changelogs(s: Settings, tables: tuple[str, ...]) -> list[str]:
    """Create the compacted changelog topics of the transaction engine's tables if missing; return those created."""
    return _create_missing(s, [(s.changelog(t), s.topic_partitions, True, None) for t in tables])


# Topics whose partition p must hold the same keys as the state kept for partition p: the inputs
# (accounts, instruments) and the lifecycle's co-partitioned pair.
PARTITIONED_AS_STATE = (TRANSACTIONS, MARKET, ACKS, ALERTS_BY_ID)


def refuse_if_topics_unfit(s: Settings) -> None:
    """Raise ConfigError, saying what to do, when a named input topic is missing or a state topic's count differs.

    A named input topic is one topic_names names; the topics state is partitioned by are the inputs,
    the lifecycle's co-partitioned pair and this deployment's changelogs.

    State is kept per partition of the input topics, in changelogs created with `topic_partitions`
    partitions. A pre-created risk.transactions of another count left the worker reading back a
    changelog partition that does not exist, retrying forever without a word of why. An input named
    explicitly is the platform's own topic: created here, a misspelt name would be read for ever, empty.
    """
    client = admin(s)
    try:
        existing = set(client.list_topics())
        missing = [f"{s.topic(t)} ({t})" for t in (TRANSACTIONS, MARKET) if t in s.topic_names
                   and s.topic(t) not in existing]
        if missing:
            raise ConfigError(f"{', '.join(missing)} named in RISKWATCH_TOPIC_NAMES does not exist on "
                              f"{s.kafka_bootstrap}: riskwatch creates no input topic it was given by name; check "
                              "the name, or create the topic first")
        changelogs = sorted(t for t in existing if t.startswith(f"{s.deployment_id}-") and t.endswith("-changelog"))
        wanted = [s.topic(t) for t in PARTITIONED_AS_STATE if s.topic(t) in existing] + changelogs
        # kafka-python 3 names the topic `name`, 2.x `topic`; a topic mid-creation or mid-deletion
        # (an error code) is left to the checks that follow it.
        counts = {str(d.get("name") or d.get("topic")): len(d.get("partitions") or ())
                  for d in (client.describe_topics(wanted) if wanted else ()) if not d.get("error_code")}
    finally:
        client.close()
    n = s.topic_partitions
    # A single-partition table's changelog has one partition whatever the setting.
    off = {t: c for t, c in counts.items() if c != n and not (t in changelogs and c == 1)}
    if not off:
        return
    said = ", ".join(f"{t} has {c}" for t, c in sorted(off.items()))
    why = (f"partition counts differ: {said} partitions, and RISKWATCH_TOPIC_PARTITIONS is {n}. Every "
           f"account's state is kept per partition of the input topics, in changelogs of "
           f"RISKWATCH_TOPIC_PARTITIONS partitions, so the counts must agree")
    source = s.topic(TRANSACTIONS)
    if source not in off:
        raise ConfigError(f"{why}: give {', '.join(sorted(off))} {n} partitions.")
    made = sorted(t for t, c in counts.items() if c == n)
    if not made:
        raise ConfigError(f"{why}: set RISKWATCH_TOPIC_PARTITIONS={off[source]}.")
    # Kafka adds partitions but never takes them away: the state kept for n cannot follow.
    raise ConfigError(f"{why}: set RISKWATCH_TOPIC_PARTITIONS={off[source]} and delete first {', '.join(made)}, "
                      f"which have {n} (riskwatch created them; any state in them was kept for {n} partitions "
                      f"and starts afresh).")


def _topic_configs(compacted: bool, delete_after_ms: int | None) -> dict[str, str]:
    if not compacted:
        return {}
    if delete_after_ms is None:
        return {"cleanup.policy": "compact"}
    return {"cleanup.policy": "compact,delete", "retention.ms": str(delete_after_ms)}


def _create_missing(s: Settings, topics: list[tuple[str, int, bool, int | None]]) -> list[str]:
    # (full name, partitions, compacted, delete after ms) for each topic; those already there are left alone.
    client = admin(s)
    try:
        existing = set(client.list_topics())
        wanted = [NewTopic(name, parts, s.topic_replication, topic_configs=_topic_configs(compacted, after))
                  for name, parts, compacted, after in topics if name not in existing]
        if wanted:
            try:
                client.create_topics(wanted, timeout_ms=30_000)
            except TopicAlreadyExistsError:
                pass  # another worker won the race
        return [t.name for t in wanted]
    finally:
        client.close()


def producer(s: Settings, **kw: Any) -> KafkaProducer:
    """A kafka-python producer for CLI commands and tests (acks=all, keys and values as bytes)."""
    return KafkaProducer(**client_config(s), acks="all", **kw)


def consumer(s: Settings, *topics: str, **kw: Any) -> KafkaConsumer:
    """A kafka-python consumer of full topic names, reading from the earliest offset unless told otherwise."""
    kw.setdefault("auto_offset_reset", "earliest")
    return KafkaConsumer(*topics, **client_config(s), **kw)


__all__ = ["PARTITIONED_AS_STATE", "admin", "aiokafka_config", "client_config", "consumer", "ensure_changelogs",
           "ensure_topics", "producer", "refuse_if_topics_unfit"]
