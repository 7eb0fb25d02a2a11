"""Provider webhooks with payloads built and signed here with test keys; the SNS signing
certificate is served by a loopback https server (self-signed, host check injected)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.bounces import EmailBounced, EmailComplained
from schemas.contacts import ContactSuppressed
from services.bounces.events import Outgoing
from services.bounces.parse import BounceContext
from services.bounces.publisher import PublishFailed
from services.bounces.verp import VerpKeys, verp_address
from services.bounces.webhooks import (
    WebhookConfig,
    create_app,
    mailgun_notifications,
    postmark_notifications,
    sendgrid_notifications,
    ses_notifications,
    sns_host_ok,
    sns_string_to_sign,
)

DOMAIN = "bounces.example.com"
KEYS = VerpKeys.parse("k:webhook-secret")
VERP = verp_address(KEYS, DOMAIN, "acme", "c1", "p1")
CONTEXT = BounceContext(DOMAIN, KEYS, None, {"c1": "acme"}.get)
MAILGUN_KEY = b"mailgun-signing-key"
NOW = 1_772_000_000.0


class Published:
    def __init__(self) -> None:
        self.records: list[Outgoing] = []
        self.fail = False

    async def __call__(self, records: list[Outgoing]) -> None:
        if self.fail:
            raise PublishFailed("broker away")
        self.records.extend(records)

    def payloads(self) -> list[object]:
        return [r.envelope.payload for r in self.records]

    def types(self) -> list[str]:
        return [r.envelope.type for r in self.records]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("sns")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return key, folder


@pytest.fixture(scope="module")
def sns_server(tls: tuple[rsa.RSAPrivateKey, Path]) -> Iterator[tuple[str, list[str]]]:
    _, folder = tls
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = (folder / "cert.pem").read_bytes() if self.path.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def _client(published: Published, tls_folder: Path | None = None, **overrides: object) -> TestClient:
    verify: ssl.SSLContext | bool = True
    if tls_folder is not None:
        verify = ssl.create_default_context(cafile=str(tls_folder / "cert.pem"))
    config = WebhookConfig(CONTEXT, published, sns_host_ok=lambda host: host == "127.0.0.1", sns_tls=verify,
                           mailgun_signing_key=MAILGUN_KEY, postmark_credentials="postmark:pw",
                           clock=lambda: NOW, **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(config))


def _sns(key: rsa.RSAPrivateKey, base: str, message: dict[str, object], version: str = "2") -> dict[str, object]:
    signed = {"MessageId": "sns-1", "TopicArn": "arn:aws:sns:eu-west-1:123:ses", "Timestamp": "2026-03-01T09:30:00Z",
              "SignatureVersion": version, "SigningCertURL": f"{base}/SimpleNotificationService-abc.pem", **message}
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303
    signature = key.sign(sns_string_to_sign(signed), padding.PKCS1v15(), digest)
    return {**signed, "Signature": base64.b64encode(signature).decode()}


SES_BOUNCE = {
    "notificationType": "Bounce",
    "bounce": {"bounceType": "Permanent", "feedbackId": "fb-1", "reportingMTA": "dsn; a.example",
               "timestamp": "2026-03-01T09:29:00.000Z",
               "bouncedRecipients": [{"emailAddress": "ann@example.net", "status": "5.1.1",
                                      "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
    "mail": {"source": VERP, "headers": [{"name": "Message-ID", "value": "<c1.p1@acme.example>"}]},
}


@pytest.mark.parametrize("version", ["1", "2"])
def test_ses_bounce_via_sns_is_verified_and_recorded(tls, sns_server, version):
    key, folder = tls
    base, _ = sns_server
    published = Published()
    body = _sns(key, base, {"Type": "Notification", "Message": json.dumps(SES_BOUNCE)}, version)
    response = _client(published, folder).post("/webhooks/ses", json=body)
    assert response.status_code == 200, response.text
    assert published.types() == ["EmailBounced", "ContactSuppressed"]
    bounced = EmailBounced.model_validate(published.payloads()[0])
    assert (bounced.contact_id, bounced.kind, bounced.status, bounced.source, bounced.provider) == (
        "p1", "hard", "5.1.1", "webhook", "ses")
    assert bounced.attribution == "verp" and bounced.dedup_key == "webhook:ses:fb-1:0"


def test_ses_complaint_by_headers_and_a_subscription_confirmation(tls, sns_server):
    key, folder = tls
    base, hits = sns_server
    published = Published()
    client = _client(published, folder)
    complaint = {"notificationType": "Complaint",
                 "complaint": {"feedbackId": "fb-2", "complaintFeedbackType": "abuse"},
                 "mail": {"source": "news@acme.example", "headers": [
                     {"name": "Message-ID", "value": "<c1.p1@acme.example>"}, {"name": "X-Campaign-ID", "value": "c1"}]}}
    body = _sns(key, base, {"Type": "Notification", "Message": json.dumps(complaint)})
    assert client.post("/webhooks/ses", json=body).status_code == 200
    assert EmailComplained.model_validate(published.payloads()[0]).attribution == "provider"
    assert ContactSuppressed.model_validate(published.payloads()[1]).reason == "complaint"
    confirm = _sns(key, base, {"Type": "SubscriptionConfirmation", "Token": "tok", "Message": "confirm",
                               "SubscribeURL": f"{base}/?Action=ConfirmSubscription&Token=tok"})
    assert client.post("/webhooks/ses", json=confirm).status_code == 200
    assert any("ConfirmSubscription" in hit for hit in hits)


def test_ses_forgeries_are_refused(tls, sns_server):
    key, folder = tls
    base, _ = sns_server
    published = Published()
    client = _client(published, folder)
    good = _sns(key, base, {"Type": "Notification", "Message": json.dumps(SES_BOUNCE)})
    tampered = {**good, "Message": json.dumps({**SES_BOUNCE, "notificationType": "Complaint"})}
    assert client.post("/webhooks/ses", json=tampered).status_code == 403
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert client.post("/webhooks/ses", json=_sns(other_key, base, {"Type": "Notification", "Message": "{}"})).status_code == 403
    plain_http = _sns(key, base.replace("https", "http"), {"Type": "Notification", "Message": "{}"})
    assert client.post("/webhooks/ses", json=plain_http).status_code == 403
    assert client.post("/webhooks/ses", json={**good, "SignatureVersion": "3"}).status_code == 403
    strict = _client(published, folder, sns_topic_arns=frozenset({"arn:aws:sns:eu-west-1:123:other"}))
    assert strict.post("/webhooks/ses", json=good).status_code == 403
    assert client.post("/webhooks/ses", content=b"{not json").status_code == 400
    assert published.records == []


def test_the_real_sns_host_rule():
    assert sns_host_ok("sns.eu-west-1.amazonaws.com") and sns_host_ok("sns.cn-north-1.amazonaws.com.cn")
    assert not sns_host_ok("sns.eu-west-1.amazonaws.com.evil.example")
    assert not sns_host_ok("evil.example") and not sns_host_ok("127.0.0.1")


def test_default_host_rule_refuses_a_loopback_certificate(tls, sns_server):
    key, folder = tls
    base, _ = sns_server
    config = WebhookConfig(CONTEXT, Published(), sns_tls=ssl.create_default_context(cafile=str(folder / "cert.pem")))
    body = _sns(key, base, {"Type": "Notification", "Message": json.dumps(SES_BOUNCE)})
    assert TestClient(create_app(config)).post("/webhooks/ses", json=body).status_code == 403


def test_sendgrid_signed_events():
    private = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    published = Published()
    client = _client(published, sendgrid_public_key=public)
    events = [{"event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 unknown", "sg_event_id": "e1",
               "verp": VERP, "timestamp": 1772000000},
              {"event": "spamreport", "sg_event_id": "e2", "verp": VERP},
              {"event": "delivered", "sg_event_id": "e3", "verp": VERP}]
    body = json.dumps(events).encode()
    stamp = str(int(NOW))
    signature = base64.b64encode(private.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    headers = {"X-Twilio-Email-Event-Webhook-Signature": signature, "X-Twilio-Email-Event-Webhook-Timestamp": stamp}
    response = client.post("/webhooks/sendgrid", content=body, headers=headers)
    assert response.status_code == 200 and response.json() == {"recorded": 2, "ignored": 0}
    assert published.types() == ["EmailBounced", "ContactSuppressed", "EmailComplained", "ContactSuppressed"]
    assert client.post("/webhooks/sendgrid", content=body + b" ", headers=headers).status_code == 403
    assert client.post("/webhooks/sendgrid", content=body).status_code == 401
    unsigned = _client(Published())
    assert unsigned.post("/webhooks/sendgrid", content=b"[{").status_code == 400


def _mailgun(event: Mapping[str, object], stamp: float = NOW, key: bytes = MAILGUN_KEY) -> dict[str, object]:
    token = "t" * 50
    signature = hmac.new(key, f"{int(stamp)}{token}".encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": str(int(stamp)), "token": token, "signature": signature}, "event-data": event}


def test_mailgun_signed_fresh_events():
    published = Published()
    client = _client(published)
    failed = {"event": "failed", "severity": "temporary", "id": "mg-1", "envelope": {"sender": VERP},
              "delivery-status": {"code": 452, "message": "4.2.2 mailbox full", "mx-host": "mx.example.net"}}
    assert client.post("/webhooks/mailgun", json=_mailgun(failed)).status_code == 200
    soft = EmailBounced.model_validate(published.payloads()[0])
    assert (soft.kind, soft.status, soft.provider) == ("soft", "4.2.2", "mailgun")
    assert published.types() == ["EmailBounced"]  # a soft bounce does not suppress
    assert client.post("/webhooks/mailgun", json=_mailgun(failed, key=b"wrong")).status_code == 403
    assert client.post("/webhooks/mailgun", json=_mailgun(failed, stamp=NOW - 3600)).status_code == 403
    assert client.post("/webhooks/mailgun", json={"event-data": failed}).status_code == 401
    assert client.post("/webhooks/mailgun", content=b"[]").status_code == 400


def test_postmark_basic_auth():
    published = Published()
    client = _client(published)
    bounce = {"RecordType": "Bounce", "Type": "HardBounce", "ID": 42, "Details": "smtp;550 5.1.1 unknown",
              "Metadata": {"verp": VERP}, "BouncedAt": "2026-03-01T09:30:00Z"}
    assert client.post("/webhooks/postmark", json=bounce, auth=("postmark", "pw")).status_code == 200
    assert published.types() == ["EmailBounced", "ContactSuppressed"]
    assert client.post("/webhooks/postmark", json=bounce, auth=("postmark", "nope")).status_code == 403
    assert client.post("/webhooks/postmark", json=bounce).status_code == 401


def test_kafka_away_is_503_so_the_provider_retries():
    published = Published()
    published.fail = True
    client = _client(published)
    failed = {"event": "failed", "severity": "permanent", "id": "mg-2", "envelope": {"sender": VERP}}
    assert client.post("/webhooks/mailgun", json=_mailgun(failed)).status_code == 503


@pytest.mark.parametrize("path", ["/webhooks/ses", "/webhooks/sendgrid", "/webhooks/mailgun", "/webhooks/postmark"])
@pytest.mark.parametrize("body", [b"", b"null", b"[]", b"{}", b"\xff\xfe", b'{"Type": 5}', b"[1, {\"event\": []}]"])
def test_junk_is_never_a_5xx(path, body):
    response = _client(Published()).post(path, content=body, headers={"Authorization": "Basic cG9zdG1hcms6cHc="})
    assert response.status_code < 500, (path, body, response.text)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_KEYS = st.sampled_from(["notificationType", "eventType", "bounce", "complaint", "mail", "headers", "source",
                         "bouncedRecipients", "bounceType", "event", "type", "status", "sg_event_id", "id",
                         "severity", "delivery-status", "envelope", "user-variables", "message", "RecordType",
                         "Type", "ID", "Metadata", "timestamp", "BouncedAt", "Details"])
_SHAPED = st.recursive(
    st.none() | st.integers() | st.text(max_size=20) | st.sampled_from(["Bounce", "Complaint", "bounce", "failed",
                                                                        "Permanent", "HardBounce", VERP]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@example({"mail": {"headers": 5}})
@example({"notificationType": "Bounce", "bounce": {"bouncedRecipients": 5}})
@given(st.one_of(_JSON, _SHAPED).filter(lambda v: isinstance(v, dict)) | st.dictionaries(_KEYS, _SHAPED))
def test_provider_mappings_never_raise_on_any_json(event):
    for mapped in (ses_notifications(event, "sns-1"), sendgrid_notifications(event),
                   mailgun_notifications(event), postmark_notifications(event)):
        assert isinstance(mapped, list)
