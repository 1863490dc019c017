"""`riskwatch check` on a real broker and a real Alertmanager: all well, then what a worker would refuse, each said."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kafka.admin import NewTopic

from app.admin import admin
from app.auth import Users
from app.faust_app import ALL_TOPICS, TRANSACTIONS
from tests.conftest import ROOT, settings_env
from tests.kafka.test_disposal_e2e import Alertmanager, WebhookSink

pytestmark = pytest.mark.kafka


def _check(s) -> tuple[int, dict[str, str]]:
    done = subprocess.run([sys.executable, "-m", "app.cli", "check"], cwd=ROOT, env=settings_env(s),
                          capture_output=True, text=True, timeout=120)
    lines = {line.split(":", 1)[0][5:]: line for line in done.stdout.splitlines()}
    return done.returncode, lines


def test_check_says_what_a_worker_needs_and_what_it_would_refuse(settings, tmp_path):
    sink = WebhookSink()
    am = Alertmanager(tmp_path, sink)
    try:
        am.start()
        users = Users(tmp_path / "users.json")
        users.add("lin", "operator", "a long enough password")
        users.save()
        s = settings.model_copy(update={"alertmanager_url": am.url, "users_file": tmp_path / "users.json"})

        code, lines = _check(s)
        assert code == 0, lines
        assert [line[:5].strip() for line in lines.values()] == ["ok"] * 9, lines
        assert lines["topics"].endswith(f"0 of {len(ALL_TOPICS)} exist; the worker creates {s.topic(TRANSACTIONS)}, "
                                        + ", ".join(s.topic(t) for t in ALL_TOPICS[1:])), lines["topics"]
        assert lines["console"] == f"ok   console: 1 account in {tmp_path / 'users.json'}"
        assert lines["paging"] == f"ok   paging: Alertmanager at {am.url} is ready; pages from level high"

        client = admin(s)
        try:
            client.create_topics([NewTopic(s.topic(TRANSACTIONS), 6, 1)], timeout_ms=30_000)
        finally:
            client.close()
        am.stop()
        code, lines = _check(s)
        assert code == 2, lines
        assert lines["topics"].startswith(f"FAIL topics: partition counts differ: {s.topic(TRANSACTIONS)} has 6"), lines
        assert lines["paging"].startswith(f"FAIL paging: cannot reach Alertmanager at {am.url}"), lines
        assert lines["kafka"].startswith("ok   kafka:"), "the rest is still checked"
    finally:
        am.stop()
        sink.close()
