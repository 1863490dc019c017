"""The worker on a broker that only lets clients in over SASL/SCRAM-SHA-512 on TLS, with pseudonymisation on."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import kafka_local
from app.faust_app import ALERTS, DEADLETTER, TRANSACTIONS
from app.schemas import Alert, DeadLetter
from app.security import Pseudonymiser
from app.settings import Settings
from tests.conftest import consume, free_port, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER = "riskwatch"
PASSWORD = f"scram-{secrets.token_hex(12)}"
PSEUDONYM_KEY = f"hmac-{secrets.token_hex(16)}"


def _openssl(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed:\n{proc.stderr}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a broker certificate for localhost and 127.0.0.1 (PEM, as Kafka reads them)."""
    d = tmp_path_factory.mktemp("tls")
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=riskwatch test CA")
    _openssl(d, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "broker.key")
    _openssl(d, "req", "-new", "-key", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(d, "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.pem", "-days", "2", "-extfile", "san.ext")
    # Kafka's PEM keystore: the unencrypted PKCS#8 key, then the certificate chain.
    keystore = d / "broker-keystore.pem"
    keystore.write_text((d / "broker.key").read_text() + (d / "broker.pem").read_text() + (d / "ca.pem").read_text())
    return {"ca": d / "ca.pem", "keystore": keystore}


@pytest.fixture(scope="module")
def secure_bootstrap(tmp_path_factory: pytest.TempPathFactory, tls: dict[str, Path]) -> Iterator[str]:
    """A local broker whose client listener is SASL_SSL with SCRAM-SHA-512; returns its bootstrap address."""
    port, cport, sport = free_port(), free_port(), free_port()
    data = tmp_path_factory.mktemp("kafka-sasl")
    extra = {
        # PLAINTEXT stays for the controller, the broker itself and kafka_local's readiness probe.
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport},SASL_SSL://127.0.0.1:{sport}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://localhost:{sport}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
        "listener.name.sasl_ssl.ssl.keystore.location": str(tls["keystore"]),
    }
    # The SCRAM user is written into the cluster metadata when the storage is formatted, before the
    # first start (kafka_local.start formats only an unformatted data dir, so it keeps this one).
    classpath = f"{kafka_local.ensure_jars()}/*"
    config = data / "server.properties"
    config.write_text(kafka_local._server_properties(port, cport, data, extra))
    cluster = kafka_local._storage_tool(classpath, "random-uuid").strip()
    kafka_local._storage_tool(classpath, "format", "-t", cluster, "-c", str(config),
                              "--add-scram", f"SCRAM-SHA-512=[name={USER},password={PASSWORD}]")
    kafka_local.start(port, controller_port=cport, data_dir=data, extra_properties=extra, timeout=120)
    try:
        yield f"localhost:{sport}"
    finally:
        kafka_local.stop(port)
        kafka_local.wipe(port, data)


def _settings(bootstrap: str, ca: Path, tmp_path: Path, **over: object) -> Settings:
    ns = f"t{uuid.uuid4().hex[:10]}."
    base = dict(kafka_bootstrap=bootstrap, topic_prefix=ns, app_id=f"rw-{ns[:-1]}", data_dir=tmp_path / "data",
                metrics_port=free_port(), web_port=free_port(), kafka_security_protocol="SASL_SSL",
                kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=USER, kafka_sasl_password=PASSWORD,
                kafka_ssl_cafile=str(ca), pseudonymise_key=PSEUDONYM_KEY)
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


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


def test_wrong_password_and_plaintext_are_refused(secure_bootstrap, tls, tmp_path):
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from app.admin import client_config

    for s in (_settings(secure_bootstrap, tls["ca"], tmp_path, kafka_sasl_password="not-the-password"),
              _settings(secure_bootstrap, tls["ca"], tmp_path, kafka_security_protocol="PLAINTEXT")):
        with pytest.raises((KafkaError, OSError)):
            KafkaAdminClient(**client_config(s), request_timeout_ms=5000, bootstrap_timeout_ms=5000).close()
