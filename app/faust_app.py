"""The Faust application: broker settings, topics and tables that the agents share."""

from __future__ import annotations

import copy
import ctypes
import io
import json
import logging
import math
import pickle
import ssl
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.serializers.codecs import RestrictedUnpickler
from faust.types import EventT, TopicT

from app import faust_fixes
from app.metrics import Metrics
from app.quarantine import Quarantine
from app.settings import Settings, get_settings
from models.detector import Calibrator, SurpriseDetector
from models.features import STATE_MAGIC, AccountState, StateCodecError
from models.market import InstrumentState

log = logging.getLogger("riskwatch.app")

# Logical topic names; the configured prefix is prepended to each.
TRANSACTIONS = "risk.transactions"
MARKET = "risk.market"
ALERTS = "risk.alerts"
DEADLETTER = "risk.deadletter"
RULES = "risk.rules"
AGGREGATES = "risk.aggregates"
CONTINGENCY = "risk.contingency"
ACKS = "risk.acks"
AUDIT = "risk.audit"
DISCLOSURE = "risk.disclosure"
SCORES = "risk.scores"
FEEDBACK = "risk.feedback"  # analysts' verdicts that move operating points, one per alert (models.feedback)
LISTS = "risk.lists"  # run-time block, watch and allow list entries, one record per entry (models.lists)
# Disposal internals: warnings re-keyed by alert_id (co-partitioned with risk.acks), disclosure partials.
ALERTS_BY_ID = "risk.alerts.by-id"
DISCLOSURE_PARTIALS = "risk.disclosure.partials"
ALL_TOPICS = (TRANSACTIONS, MARKET, ALERTS, DEADLETTER, RULES, AGGREGATES, CONTINGENCY, ACKS, AUDIT, DISCLOSURE,
              SCORES, ALERTS_BY_ID, DISCLOSURE_PARTIALS, FEEDBACK, LISTS)
# Control and second-stage topics have one partition: every reader must see every message in order.
SINGLE_PARTITION = (RULES, AGGREGATES, DISCLOSURE_PARTIALS, FEEDBACK, LISTS)
COMPACTED = (RULES, FEEDBACK, LISTS)


class StateUnpickler(RestrictedUnpickler):  # type: ignore[misc]
    """Faust's restricted unpickler that also allows riskwatch's state classes, and nothing else.

    Table values are our own state classes; the allowlist refuses anything else a hostile writer to
    a changelog topic might plant (plain pickle would execute it). A subclass, not an edit of
    Faust's `ALLOWED_CLASSES`: that would widen Faust's `restricted_pickle` codec for every app in
    the process. Account states use the compact codec of models.features (dump_account/load_account);
    AccountState stays allowed so that pickled account states written by earlier versions still load.
    """

    ALLOWED_CLASSES = {  # noqa: RUF012 - Faust's base declares this dict
        **RestrictedUnpickler.ALLOWED_CLASSES,
        "array": frozenset({"array", "_array_reconstructor"}),
        "models.features": frozenset({"AccountState"}),
        "models.market": frozenset({"InstrumentState"}),
        "models.detector": frozenset({"SurpriseDetector", "Calibrator"}),
    }


def restricted_loads(blob: bytes) -> Any:
    """Unpickle riskwatch state, refusing any class outside StateUnpickler's allowlist."""
    return StateUnpickler(io.BytesIO(blob)).load()


def dumps(state: Any) -> bytes:
    """Pickle a state object for a table."""
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def dump_account(state: AccountState) -> bytes:
    """An account's table value: the compact binary codec, or the pickle form for a state it cannot hold exactly."""
    try:
        return state.to_bytes()
    except StateCodecError:
        # Never expected from the scorer (its fields keep their types), but exactness beats size.
        return dumps(state)


def load_account(blob: bytes) -> AccountState:
    """Read an account's table value: compact codec, or a pickle written by an earlier version (restricted)."""
    head = blob[:1]
    if head == STATE_MAGIC:
        return AccountState.from_bytes(blob)
    if head == b"\x80":
        try:
            state = restricted_loads(blob)
        except Exception as exc:  # noqa: BLE001 - the unpickler raises many types on garbage: report one
            raise StateCodecError(f"unreadable pickled AccountState: {type(exc).__name__}: {exc}") from None
        if type(state) is not AccountState:
            raise StateCodecError(f"pickled account state is a {type(state).__name__}, not an AccountState")
        return state
    raise StateCodecError(f"not an AccountState blob (starts with {bytes(head)!r})")


# Detector snapshots (the models table): DETECTOR_MAGIC, a format byte, then a zlib-compressed pickle.
# Format 0 is the bare zlib stream written before formats existed (it starts with 0x78, never "RWD").
# A release that changes the snapshot reads the formats it knows and refuses others per value
# (app/quarantine.py: that partition's detector starts afresh), never per partition.
DETECTOR_MAGIC = b"RWD"
DETECTOR_FORMAT = 1


def dump_detector(det: SurpriseDetector) -> bytes:
    """A detector snapshot for the models table, in the current format."""
    return DETECTOR_MAGIC + bytes([DETECTOR_FORMAT]) + zlib.compress(dumps(det), 1)


def load_detector(blob: bytes) -> SurpriseDetector:
    """Read a detector snapshot of format 0 or 1; StateCodecError saying why if it is not one this release can use."""
    body = blob
    if blob[:3] == DETECTOR_MAGIC:
        fmt = blob[3] if len(blob) > 3 else None
        if fmt != DETECTOR_FORMAT:
            raise StateCodecError(f"detector snapshot of format {fmt}; this release reads formats 0 and "
                                  f"{DETECTOR_FORMAT}")
        body = blob[4:]
    try:
        det = restricted_loads(zlib.decompress(body))
    except Exception as exc:  # noqa: BLE001 - zlib and the unpickler raise many types on garbage: report one
        raise StateCodecError(f"not a detector snapshot: {type(exc).__name__}: {exc}") from None
    check_detector(det)
    return det


def check_detector(det: Any) -> None:
    """Refuse an unpickled object the scorer cannot use as its detector (wrong class, attributes or sizes).

    A snapshot of an incompatible release unpickles without error and then fails every event it
    scores; checked here, it is refused once and the partition's detector starts afresh.
    """
    if type(det) is not SurpriseDetector:
        raise StateCodecError(f"detector snapshot holds a {type(det).__name__}, not a SurpriseDetector")
    state = vars(det)
    missing = sorted({"weights", "horizon", "_w", "calibrator"} - set(state))
    if missing:
        raise StateCodecError(f"detector snapshot lacks {', '.join(missing)}: written by an incompatible release")
    cal = det.calibrator
    ok = (type(cal) is Calibrator and isinstance(cal.bins, int) and cal.bins > 0 and len(cal.counts) == cal.bins
          and _finite(cal.total) and cal.total >= 0 and _finite(cal.max_raw) and cal.max_raw > 0
          and _finite(det.horizon) and det.horizon > 0
          and isinstance(det._w, dict) and all(isinstance(k, str) and _finite(v) for k, v in det._w.items())
          and _points_ok(det.points) and _shifts_ok(det.shifts) and _finite(det.share))
    if not ok:
        raise StateCodecError("detector snapshot has attributes of the wrong type or size")
    try:
        det.score_raw(1.0)
    except Exception as exc:  # noqa: BLE001 - whatever the scorer would have met on every event
        raise StateCodecError(f"detector snapshot cannot score: {type(exc).__name__}: {exc}") from None


def _points_ok(points: Any) -> bool:
    """Operating points: None, or category -> [log share, window start, counted, share], all finite."""
    return points is None or (isinstance(points, dict) and all(
        isinstance(k, str) and type(v) is list and len(v) == 4 and all(_finite(x) for x in v)
        for k, v in points.items()))


def _shifts_ok(shifts: Any) -> bool:
    """Type shifts: None, or (credits, debits), each type -> [shift, count], all finite."""
    return shifts is None or (type(shifts) is tuple and len(shifts) == 2 and all(
        isinstance(side, dict) and all(isinstance(k, str) and type(v) is list and len(v) == 2
                                       and all(_finite(x) for x in v) for k, v in side.items())
        for side in shifts))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


Shifts = tuple[dict[str, list[float]], dict[str, list[float]]]


ShiftVersions = list[tuple[int | None, Shifts]]


def dump_shifts(versions: ShiftVersions) -> bytes:
    """A detector's per-type amount shifts, each as of an input offset, as JSON (see PartitionModels)."""
    return json.dumps({"versions": [{"through": through, "credit": sh[0], "debit": sh[1]} for through, sh in versions]},
                      separators=(",", ":")).encode()


def load_shifts(blob: bytes) -> ShiftVersions:
    """Read dump_shifts' JSON (or an earlier release's single, undated snapshot); StateCodecError if not that."""
    try:
        doc = json.loads(blob)
        docs = doc["versions"] if "versions" in doc else [dict(doc, through=None)]
        versions: ShiftVersions = []
        for d in docs:
            through = d["through"]
            if through is not None and type(through) is not int:
                raise TypeError(f"through is {through!r}, not an offset")
            versions.append((through, ({k: [float(x) for x in v] for k, v in d["credit"].items()},
                                       {k: [float(x) for x in v] for k, v in d["debit"].items()})))
    except Exception as exc:  # noqa: BLE001 - JSON, keys and types fail many ways on garbage: report one
        raise StateCodecError(f"not a type-shift snapshot: {type(exc).__name__}: {exc}") from None
    if not versions or not all(_shifts_ok(sh) for _, sh in versions):
        raise StateCodecError("type-shift snapshot has values of the wrong type or size")
    return versions


def load_instrument(blob: bytes) -> InstrumentState:
    """Read an instrument's table value (restricted pickle); StateCodecError if it is not an InstrumentState."""
    try:
        state = restricted_loads(blob)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types on garbage: report one
        raise StateCodecError(f"unreadable instrument state: {type(exc).__name__}: {exc}") from None
    if type(state) is not InstrumentState:
        raise StateCodecError(f"instrument state is a {type(state).__name__}, not an InstrumentState")
    return state


class StateTable(faust.Table):  # type: ignore[misc]
    """A Faust table that checks each changelog value as it reads it back (the app's `Table=` class).

    Table values are bytes we decode ourselves, so Faust recovers anything; a value that does not
    decode then failed the first timer that read it and the worker exited ("Crashed reason=1
    validation error for Lifecycle", issue 17). With `options={"check": ..., "quarantine": ...}`
    (`Runtime.checked`) a value `check` refuses is set aside (app/quarantine.py) and its key left
    absent, as if deleted; other tables recover unchanged.
    """

    def apply_changelog_batch(self, batch: Iterable[EventT]) -> None:
        opts = self.options or {}
        check: Callable[[bytes], Any] | None = opts.get("check")
        quarantine: Quarantine | None = opts.get("quarantine")
        if check is None or quarantine is None:
            super().apply_changelog_batch(batch)
            return
        events = []
        for event in batch:
            msg = event.message
            if msg.value is not None:
                try:
                    check(msg.value)
                except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the value is set aside
                    quarantine.set_aside(self.name, msg.topic, msg.partition, event.key or b"", msg.value, exc,
                                         msg.offset)
                    event = _tombstone(event)
            events.append(event)
        super().apply_changelog_batch(events)


def _tombstone(event: EventT) -> EventT:
    """A copy of a changelog event with no value: the store deletes its key."""
    out = copy.copy(event)
    msg = copy.copy(event.message)
    msg.value = None
    out.message = msg
    out.value = None
    return out


def credentials(s: Settings) -> Any:
    """Faust broker credentials from settings (None for PLAINTEXT)."""
    proto = s.kafka_security_protocol.upper()
    ctx: ssl.SSLContext | None = None
    if proto in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=s.kafka_ssl_cafile or None)
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=s.kafka_sasl_password.get_secret_value(),
            mechanism=s.kafka_sasl_mechanism or "PLAIN",
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


@dataclass
class Runtime:
    """The app and everything agents share: topics, tables, metrics, settings."""

    settings: Settings
    app: faust.App
    metrics: Metrics
    topics: dict[str, TopicT]
    instruments: Any
    quarantine: Quarantine
    extras: dict[str, Any] = field(default_factory=dict)

    def checked(self, check: Callable[[bytes], Any]) -> dict[str, Any]:
        """`options` for a Faust table whose changelog values `check` must accept (StateTable)."""
        return {"check": check, "quarantine": self.quarantine}


# Large blocks (dict tables of the per-account maps, fetched record batches) from 128 KiB up get
# their own mmap, returned to the system when freed. glibc would otherwise raise this threshold
# after the first such free and carve later ones from the heap, where freed holes stay resident:
# measured, that fragmentation was ~300 B of RSS per tracked account (issue 8).
MMAP_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds so the worker's RSS follows its live data; False off glibc."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))


def _app_settings(s: Settings) -> dict[str, Any]:
    """The Faust app's settings (its id, s.deployment_id, is <prefix><app id>: deployments never meet)."""
    # Faust's consumer and producer with riskwatch's fixes, by the broker URL's scheme: without them
    # a restart or failover can skip records (app/faust_fixes.py).
    scheme = faust_fixes.transport_scheme()
    return dict(
        broker=[f"{scheme}://{h.strip()}" for h in s.kafka_bootstrap.split(",")],
        broker_credentials=credentials(s),
        store="memory://",
        datadir=str(s.data_dir),
        topic_partitions=s.topic_partitions,
        topic_replication_factor=s.topic_replication,
        processing_guarantee="at_least_once",
        web_enabled=True,
        web_host=s.web_host,
        web_port=s.web_port,
        web_bind=s.web_host,
        # Faust's own routes expose internals (table contents, cluster topology, sensor counters, the
        # service graph) and nothing here routes through them: all off. agents/web.py refuses any
        # other path but to admins, should a later Faust add one.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        stream_recovery_delay=0.0,
        broker_commit_interval=1.0,
        # How long a crashed worker's partitions wait before another worker takes them over.
        broker_session_timeout=s.kafka_session_timeout,
        broker_heartbeat_interval=min(3.0, s.kafka_session_timeout / 3),
        # Unless the same worker comes back first: then, under static membership, at once.
        consumer_group_instance_id=s.instance_id or None,
        # A returning static member is handed its previous assignment, whose metadata carries the URL
        # it had; Faust's assignor asserts it is the same and otherwise stops consuming (measured: a
        # restart on another web port never warned again). Nothing routes to it (no table views).
        canonical_url=f"http://{s.instance_id}" if s.instance_id else None,
        consumer_auto_offset_reset="earliest",
        producer_linger=0.005,
        producer_compression_type=compression(s),
        table_cleanup_interval=30.0,
        # No standby replicas: with the memory store each would double a worker's RAM. Failover
        # replays the changelog. (Takeovers that "never committed again" were Faust's seek race,
        # app/faust_fixes.py, not the standbys.)
        table_standby_replicas=0,
        Table=StateTable,  # changelog values that do not decode are set aside, not fatal (issue 17)
    )


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> Runtime:
    """Build the Faust app with riskwatch's topics and tables (agents are attached by agents.attach)."""
    s = settings or get_settings()
    metrics = metrics or Metrics()
    tune_malloc()
    app = faust.App(s.deployment_id, **_app_settings(s))

    def topic(name: str, **kw: Any) -> TopicT:
        return app.topic(s.topic(name), key_type=bytes, value_type=bytes, value_serializer="raw",
                         key_serializer="raw", **kw)

    topics = {name: topic(name) for name in ALL_TOPICS}
    deadletters = topics[DEADLETTER]
    deadletters_name = deadletters.get_topic_name()

    async def send_deadletter(key: bytes, value: bytes) -> None:
        await deadletters.send(key=key, value=value)
        metrics.events_published.labels(deadletters_name).inc()

    quarantine = Quarantine(metrics, send_deadletter)

    @app.timer(interval=1.0)
    async def send_quarantined() -> None:
        # Values the Faust tables set aside while recovering (StateTable), sent from here.
        try:
            await quarantine.flush()
        except Exception as exc:  # noqa: BLE001 - kept queued for the next tick
            log.warning("sending set-aside state values to the dead-letter topic failed: %s", exc)

    # Tables: per-entity state survives restarts through their changelog topics (pickled values).
    # Values are bytes we pickle ourselves (restricted on load): Faust's table codecs are JSON or raw.
    # use_partitioner: writes (and idle-eviction deletes from a timer) go to the key's own partition.
    # The transaction engine's tables (accounts, models, disclosure totals) are its own: app/changelog.py.
    instruments = app.Table("instruments", default=None, key_type=bytes, value_type=bytes, use_partitioner=True,
                            partitions=s.topic_partitions, options={"check": load_instrument, "quarantine": quarantine})
    return Runtime(s, app, metrics, topics, instruments, quarantine)


CODECS = ("gzip", "snappy", "lz4", "zstd")


def missing_codecs() -> list[str]:
    """Kafka compression codecs that aiokafka (the worker) or kafka-python (replay, the CLI) cannot read here.

    Producers pick their codec, and Java's and librdkafka's are often snappy, lz4 or zstd: a worker
    without the codec once retried the same batch for ever ("Libraries for snappy compression codec
    not found"). They are dependencies, so this is empty unless an install left them out.
    """
    import aiokafka.codec as aio
    import kafka.codec as kp

    return [c for c in CODECS if not (getattr(aio, f"has_{c}")() and getattr(kp, f"has_{c}")())]


def compression(s: Settings) -> str | None:
    """The codec the worker's producers write with (RISKWATCH_KAFKA_COMPRESSION), None for none."""
    return None if s.kafka_compression == "none" else s.kafka_compression


__all__ = [
    "ALL_TOPICS",
    "Runtime",
    "StateTable",
    "StateUnpickler",
    "check_detector",
    "compression",
    "create_app",
    "credentials",
    "dump_account",
    "dump_detector",
    "dump_shifts",
    "dumps",
    "load_account",
    "load_detector",
    "load_instrument",
    "load_shifts",
    "missing_codecs",
    "restricted_loads",
]
