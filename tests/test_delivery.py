from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port, raw_server
from mlflow import MlflowClient

from tasks.track import delivery, tracking
from tasks.track.delivery import MetricsOutbox, TrackingUnavailableError, check_reachable


def test_an_unreachable_server_is_named_within_the_bound(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"{uri} did not answer within 2 s"):
        check_reachable(within=2)
    assert time.monotonic() - started < 6


def login_server(handler) -> None:
    """/health for anyone; everything else for alice:right only, as MLflow's basic-auth app does."""
    right = "Basic " + base64.b64encode(b"alice:right").decode()
    allowed = handler.path == "/health" or handler.headers.get("Authorization") == right
    handler.send_response(200 if allowed else 401)
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"{}")


@pytest.mark.parametrize("login", [("alice", "right"), ("alice", "wrong-s3cret"), None])
def test_a_refused_login_is_named_at_once_without_the_password(monkeypatch, login):
    with raw_server(login_server) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for variable, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), login or ()):
            monkeypatch.setenv(variable, value)
        if login == ("alice", "right"):
            check_reachable(within=2)
            return
        with pytest.raises(TrackingUnavailableError) as refused:
            check_reachable(within=2)
    given = "the login in MLFLOW_TRACKING_USERNAME/PASSWORD" if login else "a client without a login"
    assert str(refused.value).startswith(f"the MLflow tracking server {url} refused {given} (HTTP 401)")
    assert "s3cret" not in str(refused.value)


def test_a_local_store_is_always_reachable(mlflow_store):
    started = time.monotonic()
    check_reachable()
    assert time.monotonic() - started < 1


def flaky_log_metrics(monkeypatch, failures: int) -> list[int]:
    """tracking.log_metrics that fails `failures` times first; returns the steps it was asked for."""
    real, asked = tracking.log_metrics, []

    def flaky(run_id, metrics, step=0, **kwargs):
        asked.append(step)
        if len(asked) <= failures:
            raise ConnectionError("simulated outage")
        real(run_id, metrics, step=step, **kwargs)

    monkeypatch.setattr(tracking, "log_metrics", flaky)
    return asked


def test_metrics_wait_out_an_outage_and_arrive_once_in_order(mlflow_store, monkeypatch):
    run_id = tracking.start_run("outbox", "run", {})
    asked = flaky_log_metrics(monkeypatch, failures=2)
    outbox = MetricsOutbox(run_id, patience=30)
    started = time.monotonic()
    for step in (1, 2, 3):
        outbox.put({"loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 0.5  # training never waited
    outbox.close()
    assert asked == [1, 1, 1, 2, 3]
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_an_outage_past_patience_stops_the_run_with_a_clear_error(mlflow_store, monkeypatch):
    run_id = tracking.start_run("outbox", "run", {})
    flaky_log_metrics(monkeypatch, failures=10**6)
    outbox = MetricsOutbox(run_id, patience=1)
    outbox.put({"loss": 1.0}, step=1)
    with pytest.raises(TrackingUnavailableError, match="unreachable for more than 1 s"):
        outbox.close()
    with pytest.raises(TrackingUnavailableError, match="retrying this flow run resumes"):
        outbox.put({"loss": 0.5}, step=2)
    assert MlflowClient().get_metric_history(run_id, "loss") == []


def test_the_health_check_is_asked_before_each_attempt(monkeypatch):
    answers, asked, slept = iter([False, False, True]), [], []

    def server_answers(uri: str) -> bool:
        asked.append(uri)
        return next(answers)

    monkeypatch.setattr(delivery, "server_answers", server_answers)
    monkeypatch.setattr(delivery, "time", SimpleNamespace(monotonic=time.monotonic, sleep=slept.append))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    check_reachable(within=10)  # answered at the third ask: no error
    assert asked == ["http://127.0.0.1:9"] * 3 and slept == [1, 1]


def test_credentials_in_the_tracking_uri_never_show(monkeypatch):
    port = free_port()
    for uri, shown in [
        (f"http://alice:s3cret@127.0.0.1:{port}", f"http://***@127.0.0.1:{port} did not answer within 0 s"),
        ("http://alice:s3cret@127.0.0.1/", "http://***@127.0.0.1/ did not answer within 0 s"),  # no port
        (
            "http://alice:s3cret@127.0.0.1:80a/",
            "MLFLOW_TRACKING_URI http://***@127.0.0.1:80a/ is not a valid URL",
        ),
        ("https://alice:s3cret@/mlflow", "MLFLOW_TRACKING_URI https://***@/mlflow names no host"),
    ]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(TrackingUnavailableError) as refused:
            check_reachable(within=0)  # one try
        assert shown in str(refused.value) and "s3cret" not in str(refused.value)


def test_the_outbox_names_the_server_without_its_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{free_port()}")
    outbox = MetricsOutbox("run-id", patience=0.1)
    outbox.put({"loss": 1.0}, step=1)
    with pytest.raises(
        TrackingUnavailableError, match=r"http://\*\*\*@127\.0\.0\.1:\d+ was unreachable"
    ) as away:
        outbox.close()
    assert "s3cret" not in str(away.value)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose /health answers 200, with a self-signed certificate;
    yields (its URL, the certificate's PEM file)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key_file


def test_the_health_check_verifies_tls_as_mlflows_client_does(https_server, monkeypatch):
    url, cert = https_server
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    assert not delivery.server_answers(url)  # an unknown CA: refused, as MLflow's client would
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    assert delivery.server_answers(url)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert delivery.server_answers(url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    check_reachable(within=1)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    with pytest.raises(TrackingUnavailableError, match="MLFLOW_TRACKING_INSECURE_TLS is set and so is"):
        check_reachable(within=1)
