"""The worker on a broker that only lets clients in over SASL/SCRAM-SHA-512 on TLS, with pseudonymisation on."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import kafka_local
from app.faust_app import ALERTS, DEADLETTER, TRANSACTIONS
from app.security import Pseudonymiser
from app.settings import Settings
from models.schemas import Alert, DeadLetter
from tests.conftest import ROOT, consume, free_port, produce, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER = "riskwatch"
PASSWORD = f"scram-{secrets.token_hex(12)}"
USER_256 = "riskwatch-cli"  # a second user on SCRAM-SHA-256
PASSWORD_256 = f"scram256-{secrets.token_hex(12)}"
ADMIN = "broker-admin"  # the broker's own user on its inter-broker listener
ADMIN_PASSWORD = f"admin-{secrets.token_hex(12)}"
PSEUDONYM_KEY = f"hmac-{secrets.token_hex(16)}"


def _openssl(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed:\n{proc.stderr}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a broker certificate for the host name localhost only (PEM, as Kafka reads them).

    No IP address in the certificate: a client that reaches the broker as 127.0.0.1 must refuse it.
    """
    d = tmp_path_factory.mktemp("tls")
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=riskwatch test CA")
    _openssl(d, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "broker.key")
    _openssl(d, "req", "-new", "-key", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    _openssl(d, "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.pem", "-days", "2", "-extfile", "san.ext")
    # Kafka's PEM keystore: the unencrypted PKCS#8 key, then the certificate chain.
    keystore = d / "broker-keystore.pem"
    keystore.write_text((d / "broker.key").read_text() + (d / "broker.pem").read_text() + (d / "ca.pem").read_text())
    return {"ca": d / "ca.pem", "keystore": keystore}


@pytest.fixture(scope="module")
def secure_bootstrap(tmp_path_factory: pytest.TempPathFactory, tls: dict[str, Path]) -> Iterator[str]:
    """A local broker whose only client listener is SASL_SSL (SCRAM-SHA-512 and -256); returns its bootstrap.

    No PLAINTEXT listener at all: the broker talks to itself over SASL_SSL too, as the admin user,
    and only the KRaft controller listener (not reachable by clients' protocol) stays plain.
    """
    port, cport = free_port(), free_port()
    data = tmp_path_factory.mktemp("kafka-sasl")
    jaas = ('org.apache.kafka.common.security.scram.ScramLoginModule required '
            f'username="{ADMIN}" password="{ADMIN_PASSWORD}";')
    extra = {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"SASL_SSL://localhost:{port}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "inter.broker.listener.name": "SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": jaas,
        "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
        "listener.name.sasl_ssl.ssl.keystore.location": str(tls["keystore"]),
        "listener.name.sasl_ssl.ssl.truststore.type": "PEM",
        "listener.name.sasl_ssl.ssl.truststore.location": str(tls["ca"]),
        "super.users": f"User:{ADMIN}",
    }
    # The SCRAM users are written into the cluster metadata when the storage is formatted, before the
    # first start (kafka_local.start formats only an unformatted data dir, so it keeps this one).
    classpath = f"{kafka_local.ensure_jars()}/*"
    config = data / "server.properties"
    config.write_text(kafka_local._server_properties(port, cport, data, extra))
    cluster = kafka_local._storage_tool(classpath, "random-uuid").strip()
    kafka_local._storage_tool(classpath, "format", "-t", cluster, "-c", str(config),
                              "--add-scram", f"SCRAM-SHA-512=[name={ADMIN},password={ADMIN_PASSWORD}]",
                              "--add-scram", f"SCRAM-SHA-512=[name={USER},password={PASSWORD}]",
                              "--add-scram", f"SCRAM-SHA-256=[name={USER_256},password={PASSWORD_256}]")
    probe = {"bootstrap_servers": f"localhost:{port}", "security_protocol": "SASL_SSL",
             "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": ADMIN,
             "sasl_plain_password": ADMIN_PASSWORD, "ssl_cafile": str(tls["ca"])}
    kafka_local.start(port, controller_port=cport, data_dir=data, extra_properties=extra, timeout=120, client=probe)
    try:
        yield f"localhost:{port}"
    finally:
        kafka_local.stop(port)
        kafka_local.wipe(port, data)


# What a CLI command does first: an admin client; its RiskwatchError printed, exit code 2.
_ADMIN_ONCE = """
import sys
from app.admin import admin
from app.settings import Settings
from models.errors import RiskwatchError
try:
    admin(Settings(), timeout=float(sys.argv[1]))
except RiskwatchError as exc:
    print(exc)
    sys.exit(2)
"""


def _settings(bootstrap: str, ca: Path, tmp_path: Path, **over: object) -> Settings:
    ns = f"t{uuid.uuid4().hex[:10]}."
    base = dict(kafka_bootstrap=bootstrap, topic_prefix=ns, app_id=f"rw-{ns[:-1]}", data_dir=tmp_path / "data",
                metrics_port=free_port(), web_port=free_port(), kafka_security_protocol="SASL_SSL",
                kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=USER, kafka_sasl_password=PASSWORD,
                kafka_ssl_cafile=str(ca), pseudonymise_key=PSEUDONYM_KEY)
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


# First in the file, each case in a process of its own, as a CLI command runs. The refusals came
# 16-57 s late before app.admin made kafka-python hand over a verdict that arrives with the close.
def test_each_refusal_says_why_and_a_wrong_password_or_host_fails_at_once(secure_bootstrap, tls, tmp_path):
    """Every way in but the right one is refused, and the error tells the four causes apart."""

    port = secure_bootstrap.rsplit(":", 1)[1]
    cases = [
        ("a wrong password", _settings(secure_bootstrap, tls["ca"], tmp_path, kafka_sasl_password="not-it"),
         r"refused the credentials \(SASL SCRAM-SHA-512 as user 'riskwatch'\)", True),
        ("a SCRAM-SHA-256 user asking for SCRAM-SHA-512", _settings(
            secure_bootstrap, tls["ca"], tmp_path, kafka_sasl_username=USER_256, kafka_sasl_password=PASSWORD_256),
         "refused the credentials", True),
        ("the broker's IP address, not a name in its certificate", _settings(f"127.0.0.1:{port}", tls["ca"], tmp_path),
         r"TLS certificate .* was refused \(IP address mismatch", True),
        ("PLAINTEXT to a SASL_SSL listener", _settings(secure_bootstrap, tls["ca"], tmp_path,
                                                       kafka_security_protocol="PLAINTEXT"),
         "closed every connection: does its listener expect TLS or SASL", False),
        ("nothing listening", _settings(f"localhost:{free_port()}", tls["ca"], tmp_path),
         "cannot reach Kafka at localhost:.*ECONNREFUSED", False),
    ]
    for what, s, why, at_once in cases:
        # A decisive refusal ends the retries at the first attempt that hears it (5 s, then 10 and 20:
        # a loaded machine may need two or three): well inside a 60 s budget that a retried cause
        # would use up. Each case runs in a process of its own, as a CLI command does: kafka-python
        # 3's shared network loop, after the clients of earlier tests in this process, cut every
        # SASL_SSL attempt short ("socket disconnected") before the broker's verdict arrived.
        budget = 60.0 if at_once else 8.0
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", _ADMIN_ONCE, str(budget)], cwd=ROOT, env=settings_env(s),
                              capture_output=True, text=True, timeout=budget + 60, check=False)
        took = time.monotonic() - t0
        assert done.returncode == 2, f"{what}: {done.stdout}{done.stderr}"
        assert re.search(why, done.stdout), f"{what}: {done.stdout!r} does not say {why!r}"
        assert done.stdout.count("\n") == 1, "said once, not once per retry"
        print(f"{what}: refused in {took:.1f} s")
        if at_once:
            assert took < 40.0, f"{what}: retried {took:.1f} s although retrying cannot help"


def test_worker_runs_over_sasl_scram_tls_and_keeps_secrets(secure_bootstrap, tls, tmp_path, start_worker,
                                                             make_txn):
    s = _settings(secure_bootstrap, tls["ca"], tmp_path)
    worker = start_worker(s, RISKWATCH_LOG_LEVEL="DEBUG")
    big = make_txn(account_id="acct-secret-7", counterparty_id="merchant-secret", amount=80_000)
    produce(s, TRANSACTIONS, [(b"acct-secret-7", json.dumps(big).encode()), (b"acct-secret-7", b"{broken")])

    alerts = consume(s, ALERTS, lambda got: any(a["category"] == "large_transaction" for a in got))
    alert = Alert.model_validate(next(a for a in alerts if a["category"] == "large_transaction"))
    pseudonym = Pseudonymiser(PSEUDONYM_KEY).pseudonym("acct-secret-7")
    assert alert.entity_id == pseudonym and alert.event_ids == [big["event_id"]]
    assert "acct-secret" not in json.dumps(alerts) and "merchant-secret" not in json.dumps(alerts)
    dead = [DeadLetter.model_validate(d) for d in consume(s, DEADLETTER, lambda got: len(got) >= 1)]
    assert dead[0].reason.startswith("not valid JSON")

    from app.admin import consumer

    changelog = consumer(s, s.changelog("accounts"), consumer_timeout_ms=5000)
    try:
        keys = {r.key for r in changelog}
    finally:
        changelog.close()
    assert keys == {pseudonym.encode()}, "account state must be keyed by the pseudonym only"

    time.sleep(1.0)  # let the last log lines reach the file
    page, log = worker.metrics(), worker.log_path.read_text(errors="replace")
    for secret in (PASSWORD, PSEUDONYM_KEY):
        assert secret not in log, "a secret reached the worker's log"
        assert secret not in page, "a secret reached the metrics page"
    assert "acct-secret-7" not in log, "a raw account id reached the worker's log"

    # The CLI as a second user on SCRAM-SHA-256 publishes a rule catalogue; the worker's rules
    # follower, on SCRAM-SHA-512, reads it over SASL_SSL and puts it in force.
    cli = _settings(secure_bootstrap, tls["ca"], tmp_path, topic_prefix=s.topic_prefix, app_id=s.app_id,
                    kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username=USER_256,
                    kafka_sasl_password=PASSWORD_256)
    rules = tmp_path / "rules-v7.yaml"
    rules.write_text((ROOT / "deploy" / "rules.yaml").read_text().replace("version: 1\n", "version: 7\n", 1))
    done = subprocess.run([sys.executable, "-m", "app.cli", "rules", "publish", str(rules)], cwd=ROOT,
                          env=settings_env(cli), capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while worker.metric("riskwatch_rules_version") != 7:
        assert time.monotonic() < deadline, "the rules follower did not take version 7 over SASL"
        time.sleep(0.5)
