"""Pseudonymisation at ingest, the future-time check, and secrets that never print."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from app.security import PSEUDONYMISED_FIELDS, Ingest, Pseudonymiser
from app.settings import Settings
from models.errors import ConfigError, EventError
from models.schemas import Transaction, decode_event
from tests.conftest import ROOT

KEY = "test-key-0123456789abcdef"


def _txn(make_txn, **over) -> Transaction:
    return decode_event(json.dumps(make_txn(**over)).encode(), Transaction)


def test_identifiers_are_replaced_and_nothing_else(make_txn) -> None:
    txn = _txn(make_txn, ip="10.1.2.3", country="CN")
    out = Ingest(Settings(pseudonymise_key=KEY)).transaction(txn)  # type: ignore[arg-type]
    p = Pseudonymiser(KEY)
    for name in PSEUDONYMISED_FIELDS:
        assert getattr(out, name) == p.pseudonym(getattr(txn, name))
        assert getattr(out, name) != getattr(txn, name)
    same = {k: v for k, v in out.model_dump().items() if k not in PSEUDONYMISED_FIELDS}
    assert same == {k: v for k, v in txn.model_dump().items() if k not in PSEUDONYMISED_FIELDS}


def test_pseudonyms_are_stable_keyed_and_leave_missing_fields_alone(make_txn) -> None:
    a, b = Pseudonymiser(KEY), Pseudonymiser(KEY + "-other")
    assert a.pseudonym("acct-1") == Pseudonymiser(KEY).pseudonym("acct-1") != b.pseudonym("acct-1")
    assert a.pseudonym("acct-1") != a.pseudonym("acct-2")
    txn = _txn(make_txn, device_id=None)
    assert a.transaction(txn).device_id is None and a.transaction(txn).ip is None


def test_without_a_key_events_pass_unchanged(make_txn) -> None:
    txn = _txn(make_txn)
    assert Ingest(Settings()).transaction(txn) is txn


def test_a_short_key_is_refused_with_advice() -> None:
    with pytest.raises(ConfigError, match="at least 16 random characters"):
        Ingest(Settings(pseudonymise_key="short"))  # type: ignore[arg-type]


def test_secrets_do_not_print() -> None:
    s = Settings(kafka_sasl_password="hunter2-sasl", pseudonymise_key=KEY)  # type: ignore[arg-type]
    for text in (str(s), repr(s), s.model_dump_json(), repr(Pseudonymiser(KEY))):
        assert "hunter2-sasl" not in text and KEY not in text


def test_events_far_in_the_future_are_rejected(make_txn) -> None:
    now = datetime(2026, 11, 2, 1, 0, tzinfo=UTC).timestamp()
    ingest = Ingest(Settings(max_future_seconds=3600), clock=lambda: now)
    assert ingest.transaction(_txn(make_txn, ts="2026-11-02T01:59:00+00:00"))
    with pytest.raises(EventError) as err:
        ingest.transaction(_txn(make_txn, ts="2026-11-02T02:01:00+00:00"))
    assert err.value.field == "ts" and "ahead of this worker's clock (limit 3,600 s)" in err.value.reason


def test_the_command_line_prints_pseudonyms() -> None:
    env = {"RISKWATCH_PSEUDONYMISE_KEY": KEY, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "app.security", "acct-42"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out == f"acct-42\t{Pseudonymiser(KEY).pseudonym('acct-42')}\n"


def test_a_hostile_pickle_in_the_accounts_changelog_is_refused_not_run(tmp_path) -> None:
    import os
    import pickle

    from app.faust_app import load_account, restricted_loads
    from models.features import StateCodecError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    blob = pickle.dumps(Evil(), protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(StateCodecError, match="unreadable pickled AccountState"):
        load_account(blob)
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(blob)
    assert not marker.exists()
