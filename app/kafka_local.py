"""Run a local single-node Apache Kafka broker from Maven Central jars, for tests and the demo."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import resource
from models.errors import KafkaLocalError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
_POM = resource("kafka/pom.xml")
_LOG4J_CONFIG = resource("kafka/log4j2.properties")


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker: where to connect, its process id and where its files live."""

    bootstrap: str
    pid: int
    data_dir: Path
    log_file: Path


def _cache_root() -> Path:
    return Path(os.environ.get("RISKWATCH_CACHE_DIR") or Path.home() / ".cache" / "riskwatch").expanduser()


def _default_data_dir(port: int) -> Path:
    return _cache_root() / "kafka-data" / str(port)


def _pid_file(port: int) -> Path:
    # Keyed by port outside the data dir, so status/stop find a broker started with any data_dir.
    return _cache_root() / "kafka-run" / f"{port}.json"


def _logs_tail(data_dir: Path, lines: int = 30) -> str:
    parts = []
    for path in (data_dir / "broker.log", data_dir / "server.log"):
        with contextlib.suppress(OSError):
            parts.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts) or "(no log written)"


def _check_java() -> None:
    if shutil.which("java") is None:
        raise KafkaLocalError("`java` is not on PATH: install Java 17+ (apt-get install openjdk-17-jre-headless).")
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(?:1\.)?(\d+)', out)  # Java 8 and older say "1.8.0_...".
    if not match or int(match.group(1)) < 17:
        found = out.strip().splitlines()[0] if out.strip() else "unknown"
        raise KafkaLocalError(f"Kafka {KAFKA_VERSION} needs Java 17+, found {found!r}: install openjdk-17 or newer.")


def ensure_jars() -> Path:
    """Return the folder with Kafka's runtime jars, fetching them with Maven when missing or incomplete."""
    _check_java()
    libs = _cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".riskwatch-complete"
    stamp = hashlib.sha256(_POM.read_bytes() + KAFKA_VERSION.encode()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == stamp:
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Parallel test workers must not download into one folder at once.
        if marker.is_file() and marker.read_text().strip() == stamp:
            return libs
        if shutil.which("mvn") is None:
            raise KafkaLocalError("`mvn` is not on PATH: install Maven (apt-get install maven) to fetch Kafka jars.")
        shutil.rmtree(libs, ignore_errors=True)  # A missing marker means an interrupted or stale download.
        log.info("Fetching Kafka %s jars from Maven Central into %s", KAFKA_VERSION, libs)
        started = time.monotonic()
        goal = ["dependency:copy-dependencies", f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]
        cmd = ["mvn", "-q", "-B", "-f", str(_POM), *goal, f"-Dkafka.version={KAFKA_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise KafkaLocalError(
                f"Maven could not fetch Kafka {KAFKA_VERSION} (exit {proc.returncode}); "
                f"check access to Maven Central:\n{tail}"
            )
        marker.write_text(stamp + "\n")
        log.info("Fetched Kafka jars in %.1fs", time.monotonic() - started)
    return libs


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As Java does: TIME_WAIT is not "in use".
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _controller_port(port: int, data_dir: Path, requested: int | None) -> int:
    saved = data_dir / "controller.port"
    if requested is None and saved.is_file():
        return int(saved.read_text())
    preferred = port + 1000
    cport = requested or (preferred if preferred <= 65535 and _port_free(preferred) else _free_port())
    saved.write_text(f"{cport}\n")
    return cport


def _alive(pid: int) -> bool:
    # Reap our own dead child first, or it lingers as a zombie that kill(pid, 0) still sees.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # No /proc (macOS) or it just exited: trust kill(0) until the next check.
    # "Z": exited, not yet reaped by another parent. A recycled pid may run something else, and
    # a cmdline stays empty for a moment while the new process is still inside exec().
    return state != "Z" and (not cmdline or b"kafka.Kafka" in cmdline)


def status(port: int = 9092) -> BrokerInfo | None:
    """Return the broker this module started on `port` if its process still runs, else None."""
    try:
        data = json.loads(_pid_file(port).read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(data["pid"])):
        return None
    return BrokerInfo(f"127.0.0.1:{port}", int(data["pid"]), Path(data["data_dir"]), Path(data["log_file"]))


def _server_properties(port: int, cport: int, data_dir: Path, extra: dict[str, str] | None) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{cport}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "kraft-logs"),
        # One node cannot hold the default 3 replicas: consumer groups and transactions would hang.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
    }
    props.update(extra or {})
    return "".join(f"{key}={value}\n" for key, value in props.items())


def _storage_tool(classpath: str, *args: str) -> str:
    proc = subprocess.run(
        ["java", "-cp", classpath, "kafka.tools.StorageTool", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise KafkaLocalError(f"Kafka StorageTool {args[0]} failed (try fresh=True):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _wait_ready(info: BrokerInfo, port: int, deadline: float, client: dict[str, Any] | None = None) -> None:
    from kafka import KafkaAdminClient  # Imported late: only needed once a broker is launched.

    probe = {"bootstrap_servers": info.bootstrap, "request_timeout_ms": 2000, "client_id": "riskwatch-kafka-local"}
    probe.update(client or {})  # a broker with no PLAINTEXT listener is probed as its clients connect
    # Short bootstrap waits; the option is named differently in kafka-python 2.x and 3.x.
    for option in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):
        if option in KafkaAdminClient.DEFAULT_CONFIG:
            probe[option] = 2000
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not _alive(info.pid):
            stop(port)  # Only clears the pid file: the process is gone.
            raise KafkaLocalError(f"Kafka exited during start-up:\n{_logs_tail(info.data_dir)}")
        try:
            # A plain TCP probe first: the admin client logs every refused connection at ERROR.
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            admin = KafkaAdminClient(**probe)
            try:
                if admin.describe_cluster().get("brokers"):
                    return
            finally:
                admin.close()
        except Exception as exc:  # noqa: BLE001 - any client error only means "not ready yet".
            last_error = exc
        time.sleep(0.3)
    stop(port)
    raise KafkaLocalError(
        f"Kafka did not serve metadata in time (last error: {last_error!r}). A data directory with many "
        f"topics recovers slowly after an unclean shutdown: retry with a longer `--timeout`, or wipe it with "
        f"`riskwatch kafka start --fresh` (deletes every topic in {info.data_dir}).\n{_logs_tail(info.data_dir)}"
    )


def start(
    port: int = 9092,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    timeout: float = 60.0,
    fresh: bool = False,
    extra_properties: dict[str, str] | None = None,
    client: dict[str, Any] | None = None,
) -> BrokerInfo:
    """Start a KRaft broker+controller on 127.0.0.1:`port` and wait until it serves metadata.

    Idempotent: returns the running broker's info if this module already started one on `port`.
    `fresh` stops it and wipes the data dir first. `extra_properties` override or add
    server.properties entries (e.g. more listeners); `client` is the kafka-python connection settings
    (bootstrap, security) the readiness probe uses when `port`'s listener is not PLAINTEXT. Raises
    KafkaLocalError when it cannot start.
    """
    data_dir = Path(data_dir or _default_data_dir(port)).expanduser().resolve()
    if fresh:
        wipe(port, data_dir)
    running = status(port)
    if running is not None:
        if running.data_dir != data_dir:
            raise KafkaLocalError(
                f"A local broker already runs on port {port} with data dir {running.data_dir}; call stop({port}) first."
            )
        return running
    if not _port_free(port):
        raise KafkaLocalError(f"Port {port} is in use by a process this module did not start; free it or pick another.")
    classpath = f"{ensure_jars()}/*"  # Java expands the wildcard itself; no shell involved.
    data_dir.mkdir(parents=True, exist_ok=True)
    cport = _controller_port(port, data_dir, controller_port)
    config = data_dir / "server.properties"
    config.write_text(_server_properties(port, cport, data_dir, extra_properties))
    if not (data_dir / "kraft-logs" / "meta.properties").is_file():
        cluster_id = _storage_tool(classpath, "random-uuid").strip()
        _storage_tool(classpath, "format", "-t", cluster_id, "-c", str(config))
    log_file = data_dir / "broker.log"
    # Kafka shuts log4j down itself; log4j's own hook would only add a warning to the log.
    jvm = ["-Xms256m", "-Xmx512m", f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}", "-Dlog4j2.shutdownHookEnabled=false"]
    cmd = ["java", *jvm, f"-Dkafka.logs.dir={data_dir}", "-cp", classpath, "kafka.Kafka", str(config)]
    started = time.monotonic()
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    info = BrokerInfo(f"127.0.0.1:{port}", proc.pid, data_dir, log_file)
    _pid_file(port).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(port).write_text(json.dumps({"pid": proc.pid, "data_dir": str(data_dir), "log_file": str(log_file)}))
    _wait_ready(info, port, started + timeout, client)
    elapsed = time.monotonic() - started
    log.info("Kafka %s ready on %s (pid %d) in %.1fs", KAFKA_VERSION, info.bootstrap, proc.pid, elapsed)
    return info


def stop(port: int = 9092, timeout: float = 30.0) -> bool:
    """Stop the broker this module started on `port` (SIGTERM, then SIGKILL); return whether one ran."""
    info = status(port)
    _pid_file(port).unlink(missing_ok=True)
    if info is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(info.pid):
        if time.monotonic() > deadline:
            log.warning("Kafka pid %d ignored SIGTERM for %.0fs; killing it", info.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)
    log.info("Stopped Kafka on port %d (pid %d)", port, info.pid)
    return True


def wipe(port: int = 9092, data_dir: Path | None = None) -> None:
    """Stop the broker on `port` if running and delete its data dir, so the next start is a new cluster."""
    running = status(port)
    stop(port)
    target = data_dir or (running.data_dir if running else _default_data_dir(port))
    shutil.rmtree(Path(target).expanduser(), ignore_errors=True)
