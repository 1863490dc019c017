"""All riskwatch configuration: one frozen object read from RISKWATCH_* environment variables."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from deploy import resource
from models.errors import ConfigError
from models.schemas import Level

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


class Settings(BaseSettings):
    """Every setting riskwatch reads; each field is the env var RISKWATCH_<FIELD NAME>."""

    model_config = SettingsConfigDict(env_prefix="RISKWATCH_", frozen=True, extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    topic_prefix: str = Field("", description="Prepended verbatim to every topic name, e.g. 'staging.'")
    app_id: str = Field("riskwatch", description="Names the consumer groups and changelog topics (after the topic "
                                                 "prefix: see deployment_id)")
    # Platforms name their topics by their own conventions (an existing payments.txn.v1, say): a topic
    # named here is used as it is, and the prefix is not applied to it.
    topic_names: dict[str, str] = Field(
        default_factory=dict, description='Topics named otherwise: JSON of logical name to full name, e.g. '
        '{"risk.transactions": "payments.txn.v1"} (no prefix is added to these)')
    topic_partitions: int = Field(4, ge=1, description="Partitions for topics the worker creates")
    topic_replication: int = Field(1, ge=1, description="Replication factor for topics the worker creates")
    metrics_port: int = Field(9108, description="Port of the Prometheus /metrics endpoint")
    web_host: str = Field("127.0.0.1", description="Bind address of the worker's web server")
    web_port: int = Field(6066, description="Port of the worker's web server (warnings page)")
    data_dir: Path = Field(Path(".riskwatch-data"), description="Worker state directory (Faust tables)")
    users_file: Path | None = Field(
        None, description="The console's accounts (riskwatch users); empty: users.json in the data directory")
    session_secret: SecretStr = Field(
        SecretStr(""), description="Signs console sessions (32+ characters, the same on every worker behind one "
        "address); empty: a random one per process, so a restart signs everyone out")
    console_hosts: str = Field(
        "", description="Host names the console answers to besides localhost, 127.0.0.1, ::1 and the bind address "
        "(comma-separated; DNS-rebinding defence)")
    trusted_proxies: str = Field(
        "", description="Addresses or CIDR ranges of authenticating reverse proxies whose user header is believed")
    proxy_user_header: str = Field("X-Forwarded-User", description="The trusted proxy's header naming the user")
    console_open_read_only: bool = Field(
        False, description="For local demos only: without a sign-in anyone who reaches the port may read (never act)")
    # The shipped defaults are looked up only when no file is set: found in a checkout or the installed wheel.
    rules_file: Path = Field(default_factory=lambda: resource("rules.yaml"),
                             description="Rule catalogue loaded at start")
    plans_file: Path = Field(default_factory=lambda: resource("plans.yaml"), description="Contingency-plan catalogue")
    state_ttl_seconds: float = Field(30 * 86400, gt=0, description="Evict an entity idle this long")
    model_checkpoint_every: int = Field(500, ge=1, description="Events between model snapshots per partition")
    storm_cap_per_minute: int = Field(200, ge=1, description="Warnings per category per minute before dropping")
    batch_size: int = Field(2000, ge=1, description="Most transactions the agent scores per batch")
    batch_within_seconds: float = Field(
        0.02, gt=0, description="Longest a transaction waits for its batch to fill (adds to latency)")
    publish_scores: bool = Field(False, description="Also publish every event's score to risk.scores")
    flow_partials: Literal["batched", "single"] = Field(
        "batched", description="Liquidity partials as one message per partition and batch, or one per bucket "
                               "(for a rolling upgrade from workers that read only the latter)")
    # None by default: every consumer of the output topics can read it, whatever client and extras it has.
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Codec the worker's producers compress warnings, state and every other output with")
    alertmanager_url: str = Field("", description="Alertmanager base URL; empty disables paging")
    # A level, checked at start: a misspelt one would page nothing, silently.
    page_min_level: Level = Field("high", description="Lowest warning level pushed to Alertmanager")
    escalation_check_seconds: float = Field(
        5.0, gt=0, description="How often acknowledgement and resolution deadlines are checked")
    page_refresh_seconds: float = Field(
        60.0, gt=0, description="How often firing pages are re-sent to Alertmanager (they end 4 refreshes later)")
    alert_retention_seconds: float = Field(
        7 * 86400, gt=0, description="Unresolved alerts expire this long after their resolution deadline; "
        "closed ones are forgotten this long after closing")
    disclosure_utc_offset_minutes: int = Field(
        0, ge=-720, le=840, description="Time zone of disclosure hours and days, minutes east of UTC")
    disclosure_publish_seconds: float = Field(10.0, gt=0, description="How often changed disclosure summaries go out")
    disclosure_grace_seconds: float = Field(
        600.0, ge=0, description="Event time past a window's end before its summary is marked complete")
    log_json: bool = Field(False, description="Log as JSON lines")
    log_level: str = Field("INFO", description="Python log level")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str = Field("", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (masked when printed)")
    kafka_ssl_cafile: str = Field("", description="CA bundle used to verify the brokers")
    kafka_session_timeout: float = Field(
        30.0, ge=6.0, le=300.0, description="Seconds without a heartbeat before a worker's partitions move on")
    instance_id: str = Field(
        "", max_length=200, pattern=r"^[A-Za-z0-9._-]*$",
        description="Stable name of this worker for static group membership (e.g. the StatefulSet pod name): "
        "restarted under the same name it takes its partitions back at once instead of after the session "
        "timeout. Unique per live worker; empty: dynamic membership")
    shutdown_timeout: float = Field(
        10.0, gt=0, le=120.0, description="Seconds from SIGTERM to exit, whatever the broker's state: the final "
        "flush and commit get part of it; offsets not committed by then are redelivered to the next owner")
    max_future_seconds: float = Field(
        86400.0, gt=0, description="Reject events whose time is this far ahead of the worker's clock")
    pseudonymise_key: SecretStr = Field(
        SecretStr(""), description="HMAC key; when set, identifiers are hashed at ingest")

    @property
    def users_path(self) -> Path:
        """The console's users file: RISKWATCH_USERS_FILE, else users.json in the data directory."""
        return self.users_file or self.data_dir / "users.json"

    @field_validator("topic_names")
    @classmethod
    def _valid_topic_names(cls, names: dict[str, str]) -> dict[str, str]:
        for logical, full in names.items():
            if not logical.startswith("risk."):
                raise ValueError(f"{logical!r} is not one of riskwatch's topics (risk.transactions, risk.market, "
                                 "risk.alerts, ...)")
            if not _TOPIC_NAME.fullmatch(full):
                raise ValueError(f"{full!r} is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
        if len(set(names.values())) < len(names):
            raise ValueError("two topics are given the same name")
        return names

    def __hash__(self) -> int:
        # Frozen settings stay hashable with a mapping among them (pydantic's hash takes every value as is).
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for k, v in self.__dict__.items()))

    def topic(self, name: str) -> str:
        """The full topic name of a logical one such as 'risk.alerts': as topic_names names it, else prefixed."""
        return self.topic_names.get(name) or f"{self.topic_prefix}{name}"

    @property
    def deployment_id(self) -> str:
        """`<prefix><app id>`: Faust's app id, so its group and every internal name (changelogs, leader topic) start so.

        Two deployments sharing a cluster and an app id but not a prefix (staging and production)
        then share no changelog and no group. With an empty prefix it is the app id: the names of
        earlier versions, so an unprefixed deployment keeps its state (app/migration.py moves the rest).
        """
        return f"{self.topic_prefix}{self.app_id}"

    @property
    def transactions_group(self) -> str:
        """Consumer group of the transaction engine (risk.transactions is read outside Faust's group)."""
        return f"{self.deployment_id}-transactions"

    def changelog(self, table: str) -> str:
        """Changelog topic of a table: Faust's naming (`<Faust app id>-<table>-changelog`) for the engine's too."""
        return f"{self.deployment_id}-{table}-changelog"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment.

    A value that cannot be used is a ConfigError naming the variable, what it holds (secrets withheld)
    and what it may hold: said once at start, not a traceback.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except SettingsError as exc:  # a value that is not even JSON, where JSON is wanted
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"RISKWATCH_{found.group(1).upper()}" if found else "a RISKWATCH_ variable"
        raise ConfigError(f"{name} is not valid JSON ({exc}); fix it (README.md, Settings) and start again") from None


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        field = Settings.model_fields.get(name)
        secret = field is not None and "SecretStr" in str(field.annotation)
        shown = "(withheld)" if secret else repr(err.get("input"))
        parts.append(f"RISKWATCH_{name.upper()}={shown}: {err['msg']}")
    return "; ".join(parts) + ". Fix the environment variable (README.md, Settings) and start again."


__all__ = ["Settings", "get_settings"]
