"""The demo: local Kafka, a worker, a generated stream with injected risks, and warnings printed live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.faust_app import MARKET, TRANSACTIONS
from app.settings import Settings, get_settings

DEMO_LOG = Path(".riskwatch-demo-worker.log")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def _wait_ready(proc: subprocess.Popen[bytes], metrics_url: str, timeout: float) -> bool:
    """Wait until the worker serves metrics and Faust reports it joined its group and recovered."""
    deadline = time.monotonic() + timeout
    if not _wait_http(metrics_url, timeout, proc):
        return False
    while time.monotonic() < deadline and proc.poll() is None:
        if b"Worker ready" in DEMO_LOG.read_bytes():
            return True
        time.sleep(0.5)
    return False


def rebase(events: list[dict[str, Any]], end: datetime) -> list[dict[str, Any]]:
    """Shift event times so the stream ends at `end`, keeping every gap (and so every pattern) intact."""
    if not events:
        return events
    last = datetime.fromisoformat(events[-1]["ts"])
    shift = end - last
    out = []
    for e in events:
        ts = datetime.fromisoformat(e["ts"]) + shift
        out.append({**e, "ts": ts.isoformat()})
    return out


def feed(s: Settings, events: list[dict[str, Any]], rate: float, stop: threading.Event,
         progress: dict[str, int]) -> None:
    """Produce events to their topics at about `rate` per second until done or stopped."""
    from app.admin import producer

    prod = producer(s, linger_ms=5)
    t0 = time.monotonic()
    try:
        for i, e in enumerate(events):
            if stop.is_set():
                break
            if e.get("event_type") == "market":
                prod.send(s.topic(MARKET), key=e["instrument"].encode(), value=json.dumps(e).encode())
            else:
                prod.send(s.topic(TRANSACTIONS), key=e["account_id"].encode(), value=json.dumps(e).encode())
            progress["sent"] = i + 1
            ahead = (i + 1) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        prod.flush()
    finally:
        prod.close()


def demo_operator(users_file: Path) -> str:
    """Create the demo's operator `demo` with a random password in `users_file`; return the password (shown once).

    Random per run, not a documented fixed one: the worker's port is reachable by whoever shares
    the machine, and a well-known password would let them act on cases.
    """
    import secrets

    from app.auth import Users  # argon2: only the demo and `riskwatch users` hash passwords

    password = secrets.token_urlsafe(12)
    users = Users(users_file)
    users.add("demo", "operator", password)
    users.save()
    return password


def _demo_env(produce_only: bool) -> tuple[dict[str, str], bool, str]:
    """The worker's environment (a local broker started if none is configured), whether we started it, sign-in text."""
    from app import kafka_local

    started_broker = False
    env = dict(os.environ)
    if not env.get("RISKWATCH_KAFKA_BOOTSTRAP"):
        print("Starting a local Kafka broker (first run downloads the jars with Maven; about a minute)...")
        if kafka_local.status(9092) is None:
            kafka_local.start(9092)
            started_broker = True
        env["RISKWATCH_KAFKA_BOOTSTRAP"] = "127.0.0.1:9092"
    if not produce_only:
        run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        env.setdefault("RISKWATCH_TOPIC_PREFIX", f"demo-{run_id}.")
        env.setdefault("RISKWATCH_APP_ID", f"riskwatch-demo-{run_id}")
        env.setdefault("RISKWATCH_DATA_DIR", f".riskwatch-data/demo-{run_id}")
    os.environ.update({k: env[k] for k in ("RISKWATCH_KAFKA_BOOTSTRAP", "RISKWATCH_TOPIC_PREFIX",
                                            "RISKWATCH_APP_ID", "RISKWATCH_DATA_DIR") if k in env})
    sign_in = ""
    if not produce_only and not env.get("RISKWATCH_USERS_FILE"):
        users_file = Path(env["RISKWATCH_DATA_DIR"]) / "users.json"
        env["RISKWATCH_USERS_FILE"] = str(users_file)
        sign_in = f"sign in as demo / {demo_operator(users_file)} (an operator, this demo run only; {users_file})"
    return env, started_broker, sign_in


def _show_warnings(feeder: threading.Thread, worker: subprocess.Popen[bytes] | None) -> dict[str, str]:
    """Print warnings as they arrive (a line per warning and per level it reaches) until the stream is done."""
    from app.live import follow, format_alert

    colour = sys.stdout.isatty()
    seen: dict[str, str] = {}
    done_at: list[float] = []

    def finished() -> bool:
        # Keep listening a few seconds after the last event so the final warnings show.
        if feeder.is_alive() or (worker is not None and worker.poll() is not None):
            return worker is not None and worker.poll() is not None
        done_at.append(time.monotonic())
        return time.monotonic() - done_at[0] > 10

    for alert in follow(from_beginning=True, until=finished):
        level = seen.get(alert["alert_id"])
        if level == alert["level"]:
            continue  # an ongoing burst grew: the line already on screen still tells the story
        seen[alert["alert_id"]] = alert["level"]
        prefix = "  ^ " if level is not None else ""
        print(prefix + format_alert(alert, colour), flush=True)
    return seen


def run_demo(rate: float = 300.0, produce_only: bool = False, accounts: int = 300) -> int:
    """Run the demo until the stream ends or Ctrl-C; stop everything it started."""
    from app import kafka_local
    from app.admin import ensure_topics
    from models.synth import generate

    worker: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    env, started_broker, sign_in = _demo_env(produce_only)
    get_settings.cache_clear()
    s = get_settings()
    try:
        ensure_topics(s)
        if not produce_only:
            print("Starting the worker...")
            worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(DEMO_LOG, "wb"))
            if not _wait_ready(worker, f"http://{s.web_host}:{s.metrics_port}/metrics", 120):
                print("The worker did not start; see .riskwatch-demo-worker.log", file=sys.stderr)
                return 1
        events = rebase(generate(seed=11, accounts=accounts, days=2.0, instruments=10),
                        datetime.now(UTC) + timedelta(minutes=1))
        progress = {"sent": 0}
        feeder = threading.Thread(target=feed, args=(s, events, rate, stop, progress), daemon=True)
        feeder.start()
        print(f"Feeding {len(events):,} events at ~{rate:.0f}/s to {s.topic(TRANSACTIONS)} and {s.topic(MARKET)}.")
        print(f"Metrics: http://{s.web_host}:{s.metrics_port}/metrics   Console: http://{s.web_host}:{s.web_port}/")
        if sign_in:
            print(f"Console: {sign_in}")
        print("Warnings as they arrive (Ctrl-C to stop everything):\n")
        if produce_only:
            feeder.join()
            return 0
        seen = _show_warnings(feeder, worker)
        if worker is not None and worker.poll() is not None:
            print(f"\nThe worker stopped unexpectedly (exit {worker.returncode}); its log is "
                  ".riskwatch-demo-worker.log", file=sys.stderr)
            return 1
        print(f"\nStream finished: {progress['sent']:,} events sent, {len(seen)} warnings.")
        return 0
    except KeyboardInterrupt:
        print("\nStopping...")
        return 0
    finally:
        stop.set()
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        if started_broker:
            kafka_local.stop(9092)
        print("Everything the demo started has stopped.")


__all__ = ["demo_operator", "feed", "rebase", "run_demo"]
