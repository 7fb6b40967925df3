"""The official AWS IoT Device SDK for Python v2 (awsiotsdk), used unchanged, against fleetprov-emulator.

Each provisioning test does what a device does with the SDK:
  1. connect with the claim certificate (MQTT 3.1.1 via mqtt_connection_builder, or MQTT 5 via
     mqtt5_client_builder), both with mtls_from_path;
  2. IotIdentityClientV2: CreateKeysAndCertificate or CreateCertificateFromCsr, then RegisterThing
     with DemoTemplate (JSON payloads, as the SDK sends them);
  3. disconnect, reconnect with the new certificate and key, subscribe to devices/<thing>/# and
     publish to devices/<thing>/hello, and get the message back;
  4. check the emulator's registry: the thing exists, holds the certificate, which is ACTIVE.
A further test has RegisterThing rejected (unknown template) and checks the SDK's V2ServiceException.

Every wait is bounded (TIMEOUT); no sleep stands in for synchronisation.
Set FLEETPROV_INTEROP_CRT_LOG=Debug (or Trace, Info, ...) to get the AWS CRT's own log on stderr.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import time
import uuid
from pathlib import Path

import awscrt.io
import pytest
from awscrt import mqtt, mqtt5, mqtt_request_response
from awsiot import V2ServiceException, iotidentity, mqtt5_client_builder, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

TIMEOUT = 20.0  # seconds, for every single wait
TEMPLATE = "DemoTemplate"
UNKNOWN_TEMPLATE = "NoSuchTemplate"

if os.environ.get("FLEETPROV_INTEROP_CRT_LOG"):
    awscrt.io.init_logging(getattr(awscrt.io.LogLevel, os.environ["FLEETPROV_INTEROP_CRT_LOG"]), "stderr")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def describe_error(e: BaseException) -> str:
    """Human-readable text for whatever an SDK future failed with."""
    if isinstance(e, V2ServiceException):
        parts = [f"V2ServiceException({e.message!r})"]
        if e.modeled_error is not None:
            m = e.modeled_error
            parts.append(
                f"modeled_error={type(m).__name__}(status_code={m.status_code!r}, "
                f"error_code={m.error_code!r}, error_message={m.error_message!r})"
            )
        if e.inner_error is not None:
            parts.append(f"inner_error={type(e.inner_error).__name__}: {e.inner_error}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def set_once(fut: concurrent.futures.Future, value=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


class Waiter:
    """Bounded waits on SDK futures, failing with the SDK's error and the emulator's stderr."""

    def __init__(self, emulator):
        self.emu = emulator

    def __call__(self, fut: concurrent.futures.Future, what: str, timeout: float = TIMEOUT):
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{what}: nothing within {timeout} s" + self.emu.context()) from None
        except Exception as e:  # the SDK's error, shown whole
            raise AssertionError(f"{what} failed: {describe_error(e)}" + self.emu.context()) from e


# ---------------------------------------------------------------------------------------------
# The two protocol flavours of an SDK device
# ---------------------------------------------------------------------------------------------


class Device:
    """An SDK MQTT client connected with one certificate; subclasses per protocol."""

    protocol = ""

    def __init__(self, emulator, cert: Path, key: Path, client_id: str):
        self.emu = emulator
        self.wait = Waiter(emulator)
        self.client_id = client_id
        self.cert = cert
        self.key = key
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def identity_client(self) -> iotidentity.IotIdentityClientV2:
        # As in the SDK's fleet provisioning samples: two request-response subscriptions (one
        # operation's accepted + rejected), so the client must unsubscribe between operations.
        options = mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=0,
            operation_timeout_in_seconds=int(TIMEOUT),
        )
        return iotidentity.IotIdentityClientV2(self.protocol_client(), options)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass  # the test's own failure is the one to see
        return False


class Mqtt311Device(Device):
    protocol = "MQTT 3.1.1"

    def __init__(self, emulator, cert: Path, key: Path, client_id: str):
        super().__init__(emulator, cert, key, client_id)
        self.connection = mqtt_connection_builder.mtls_from_path(
            endpoint=emulator.host,
            port=emulator.port,
            cert_filepath=str(cert),
            pri_key_filepath=str(key),
            ca_filepath=str(emulator.ca_pem),
            client_id=client_id,
            clean_session=True,
            keep_alive_secs=30,
        )
        self.connected = False
        self.wait(self.connection.connect(), f"{self.protocol} CONNECT with {cert.name} as {client_id!r}")
        self.connected = True

    def protocol_client(self):
        return self.connection

    def _on_message(self, topic, payload, dup, qos, retain, **kwargs):
        self.received.put((topic, bytes(payload)))

    def subscribe(self, topic_filter: str) -> None:
        fut, _packet_id = self.connection.subscribe(topic_filter, mqtt.QoS.AT_LEAST_ONCE, self._on_message)
        suback = self.wait(fut, f"{self.protocol} SUBSCRIBE {topic_filter}")
        assert suback["qos"] in (mqtt.QoS.AT_MOST_ONCE, mqtt.QoS.AT_LEAST_ONCE), (
            f"SUBACK for {topic_filter}: {suback}" + self.emu.context()
        )

    def publish(self, topic: str, payload: bytes) -> None:
        fut, _packet_id = self.connection.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
        self.wait(fut, f"{self.protocol} PUBLISH (QoS 1) {topic}")

    def close(self) -> None:
        if self.connected:
            self.connected = False
            self.wait(self.connection.disconnect(), f"{self.protocol} DISCONNECT")


class Mqtt5Device(Device):
    protocol = "MQTT 5"

    def __init__(self, emulator, cert: Path, key: Path, client_id: str):
        super().__init__(emulator, cert, key, client_id)
        self.connection_success: concurrent.futures.Future = concurrent.futures.Future()
        self.stopped: concurrent.futures.Future = concurrent.futures.Future()
        self.disconnections: list[str] = []
        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint=emulator.host,
            port=emulator.port,
            cert_filepath=str(cert),
            pri_key_filepath=str(key),
            ca_filepath=str(emulator.ca_pem),
            client_id=client_id,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            on_publish_received=self._on_publish_received,
            on_lifecycle_connection_success=self._on_connection_success,
            on_lifecycle_connection_failure=self._on_connection_failure,
            on_lifecycle_disconnection=self._on_disconnection,
            on_lifecycle_stopped=self._on_stopped,
        )
        self.client.start()
        self.started = True
        try:
            self.wait(self.connection_success, f"{self.protocol} CONNECT with {cert.name} as {client_id!r}")
        except BaseException:
            self.close_quietly()
            raise

    def protocol_client(self):
        return self.client

    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData):
        set_once(self.connection_success, data)

    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData):
        reason = data.exception or RuntimeError("connection failure")
        if data.connack_packet is not None:
            reason = RuntimeError(f"{reason}; CONNACK reason code {data.connack_packet.reason_code!r}")
        set_once(self.connection_success, exc=reason)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData):
        pkt = data.disconnect_packet
        self.disconnections.append(f"{data.exception}; DISCONNECT {pkt.reason_code!r}" if pkt else f"{data.exception}")

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData):
        set_once(self.stopped, True)

    def _on_publish_received(self, data: mqtt5.PublishReceivedData):
        packet = data.publish_packet
        self.received.put((packet.topic, bytes(packet.payload or b"")))

    def subscribe(self, topic_filter: str) -> None:
        packet = mqtt5.SubscribePacket(
            subscriptions=[mqtt5.Subscription(topic_filter=topic_filter, qos=mqtt5.QoS.AT_LEAST_ONCE)]
        )
        suback = self.wait(self.client.subscribe(packet), f"{self.protocol} SUBSCRIBE {topic_filter}")
        assert suback.reason_codes and all(int(c) < 0x80 for c in suback.reason_codes), (
            f"SUBACK for {topic_filter}: {suback}" + self.emu.context()
        )

    def publish(self, topic: str, payload: bytes) -> None:
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
        done = self.wait(self.client.publish(packet), f"{self.protocol} PUBLISH (QoS 1) {topic}")
        assert done.puback is not None and int(done.puback.reason_code) < 0x80, (
            f"PUBACK for {topic}: {done.puback}" + self.emu.context()
        )

    def close(self) -> None:
        if self.started:
            self.started = False
            self.client.stop()
            self.wait(self.stopped, f"{self.protocol} client stop")

    def close_quietly(self) -> None:
        try:
            self.close()
        except Exception:
            pass


DEVICES = {"mqtt311": Mqtt311Device, "mqtt5": Mqtt5Device}


# ---------------------------------------------------------------------------------------------
# Keys, CSRs and checks on what the emulator issues
# ---------------------------------------------------------------------------------------------


def new_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(kind)


def make_csr(key, common_name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_issued_certificate(emulator, certificate_id: str, certificate_pem: str, private_key) -> None:
    """What the spec says of an issued certificate, checked on what the SDK handed back."""
    ctx = emulator.context()
    assert isinstance(certificate_pem, str) and "BEGIN CERTIFICATE" in certificate_pem, (
        f"certificatePem is not a PEM certificate: {certificate_pem!r}" + ctx
    )
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    der_sha256 = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert certificate_id == der_sha256, (
        f"certificateId {certificate_id!r} is not the SHA-256 of the certificate's DER ({der_sha256})" + ctx
    )
    cas = x509.load_pem_x509_certificates(emulator.ca_pem.read_bytes())
    errors = []
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            break
        except Exception as e:  # noqa: PERF203 - a handful of CAs at most
            errors.append(f"{ca.subject.rfc4514_string()}: {type(e).__name__}: {e}")
    else:
        raise AssertionError(f"certificate not issued by ca.pem: {errors}" + ctx)
    assert spki(cert.public_key()) == spki(private_key.public_key()), (
        "the certificate's public key does not match the device's private key" + ctx
    )
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert cns == ["AWS IoT Certificate"], f"subject CN {cns}, expected ['AWS IoT Certificate']" + ctx


def write_credentials(directory: Path, name: str, certificate_pem: str, private_key_pem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}.cert.pem"
    key_path = directory / f"{name}.private.key"
    cert_path.write_text(certificate_pem)
    key_path.touch(mode=0o600)
    key_path.write_text(private_key_pem)
    return cert_path, key_path


def demo_template(emulator) -> dict:
    return json.loads((emulator.templates_dir / f"{TEMPLATE}.json").read_text())


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

EC_KEYS = pytest.mark.emulator_args("--key-type", "ec")

PROVISIONING_CASES = [
    # (protocol, certificate API, key kind); CreateKeysAndCertificate over MQTT 3.1.1 runs the
    # emulator's default RSA-2048 PKCS#1 keys (as AWS), over MQTT 5 its --key-type ec keys.
    pytest.param("mqtt311", "keys", "rsa", id="mqtt311-CreateKeysAndCertificate-rsa"),
    pytest.param("mqtt311", "csr", "rsa", id="mqtt311-CreateCertificateFromCsr-rsa"),
    pytest.param("mqtt5", "keys", "ec", id="mqtt5-CreateKeysAndCertificate-ec", marks=EC_KEYS),
    pytest.param("mqtt5", "csr", "ec", id="mqtt5-CreateCertificateFromCsr-ec"),
]


@pytest.mark.parametrize("protocol, api, key_kind", PROVISIONING_CASES)
def test_provision_reconnect_pubsub(emulator, tmp_path, protocol, api, key_kind):
    wait = Waiter(emulator)
    Dev = DEVICES[protocol]
    serial = f"{protocol}-{api}-{uuid.uuid4().hex[:12]}"
    expected_thing = f"demo-{serial}"

    # 1-2. Claim connection, new certificate, RegisterThing.
    with Dev(emulator, emulator.claim_pem, emulator.claim_key, client_id=f"claim-{serial}") as claim:
        identity = claim.identity_client()

        if api == "keys":
            created = wait(
                identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()),
                f"CreateKeysAndCertificate over {claim.protocol}",
            )
            assert isinstance(created, iotidentity.CreateKeysAndCertificateResponse), created
            assert created.private_key and created.certificate_ownership_token, f"{created!r}" + emulator.context()
            private_key_pem = created.private_key
            private_key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
            if key_kind == "rsa":
                assert private_key_pem.lstrip().startswith("-----BEGIN RSA PRIVATE KEY-----"), (
                    "default CreateKeysAndCertificate key is not PKCS#1 RSA PEM: "
                    f"{private_key_pem.lstrip().splitlines()[0]!r}" + emulator.context()
                )
                assert isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size == 2048, private_key
            else:
                assert isinstance(private_key, ec.EllipticCurvePrivateKey), private_key
                assert private_key.curve.name == "secp256r1", private_key.curve.name
        else:
            private_key = new_key(key_kind)
            csr_pem = make_csr(private_key, f"device-{serial}")
            created = wait(
                identity.create_certificate_from_csr(
                    iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem)
                ),
                f"CreateCertificateFromCsr ({key_kind} key) over {claim.protocol}",
            )
            assert isinstance(created, iotidentity.CreateCertificateFromCsrResponse), created
            assert created.certificate_ownership_token, f"{created!r}" + emulator.context()
            private_key_pem = private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()

        certificate_id = created.certificate_id
        check_issued_certificate(emulator, certificate_id, created.certificate_pem, private_key)

        before = emulator.registry()
        status = {c["id"]: c["status"] for c in before["certificates"]}
        assert status.get(certificate_id) == "PENDING_ACTIVATION", (
            f"new certificate {certificate_id} before RegisterThing: {status.get(certificate_id)!r}"
            f"\nregistry: {json.dumps(before, indent=1)}" + emulator.context()
        )

        registered = wait(
            identity.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name=TEMPLATE,
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": serial},
                )
            ),
            f"RegisterThing({TEMPLATE}) over {claim.protocol}",
        )
        assert isinstance(registered, iotidentity.RegisterThingResponse), registered
        assert registered.thing_name == expected_thing, f"{registered!r}" + emulator.context()
        template_config = demo_template(emulator).get("DeviceConfiguration")
        if template_config:
            config = registered.device_configuration or {}
            assert set(config) == set(template_config), f"deviceConfiguration {config!r}" + emulator.context()
            assert all(isinstance(v, str) for v in config.values()), f"{config!r}"

    # 3. Reconnect with the new certificate and key, as the thing; a pub/sub round trip.
    cert_path, key_path = write_credentials(tmp_path / "device", expected_thing, created.certificate_pem, private_key_pem)
    with Dev(emulator, cert_path, key_path, client_id=expected_thing) as device:
        device.subscribe(f"devices/{expected_thing}/#")
        topic = f"devices/{expected_thing}/hello"
        payload = json.dumps({"hello": serial, "nonce": uuid.uuid4().hex}).encode()
        device.publish(topic, payload)
        deadline = time.monotonic() + TIMEOUT
        others = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                got = device.received.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"{device.protocol}: published {payload!r} on {topic} while subscribed to "
                    f"devices/{expected_thing}/#, nothing came back within {TIMEOUT} s (other messages: {others})"
                    + emulator.context()
                ) from None
            if got == (topic, payload):
                break
            others.append(got)

    # 4. The registry: thing, its certificate, ACTIVE.
    reg = emulator.registry()
    dump = f"\nregistry: {json.dumps(reg, indent=1)}"
    things = {t["name"]: t for t in reg["things"]}
    assert expected_thing in things, f"thing {expected_thing} not in registry" + dump
    assert certificate_id in things[expected_thing]["certificates"], (
        f"certificate {certificate_id} not attached to {expected_thing}" + dump
    )
    status = {c["id"]: c["status"] for c in reg["certificates"]}
    assert status.get(certificate_id) == "ACTIVE", f"certificate {certificate_id}: {status.get(certificate_id)!r}" + dump


@pytest.mark.parametrize("protocol", ["mqtt311", "mqtt5"])
@EC_KEYS
def test_register_thing_unknown_template_rejected(emulator, protocol):
    wait = Waiter(emulator)
    serial = f"{protocol}-reject-{uuid.uuid4().hex[:12]}"

    with DEVICES[protocol](emulator, emulator.claim_pem, emulator.claim_key, client_id=f"claim-{serial}") as claim:
        identity = claim.identity_client()
        created = wait(
            identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()),
            f"CreateKeysAndCertificate over {claim.protocol}",
        )
        future = identity.register_thing(
            iotidentity.RegisterThingRequest(
                template_name=UNKNOWN_TEMPLATE,
                certificate_ownership_token=created.certificate_ownership_token,
                parameters={"SerialNumber": serial},
            )
        )
        try:
            outcome = future.result(TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise AssertionError(
                f"RegisterThing({UNKNOWN_TEMPLATE}) over {claim.protocol}: no answer within {TIMEOUT} s"
                + emulator.context()
            ) from None
        except V2ServiceException as e:
            error = e
        else:
            raise AssertionError(
                f"RegisterThing({UNKNOWN_TEMPLATE}) was accepted: {outcome!r}" + emulator.context()
            )

    # The SDK surfaces the /rejected payload as the modeled error, with no inner (transport) error.
    detail = describe_error(error) + emulator.context()
    assert error.inner_error is None, detail
    assert isinstance(error.modeled_error, iotidentity.V2ErrorResponse), detail
    assert error.modeled_error.status_code == 404, detail
    assert error.modeled_error.error_code == "ResourceNotFound", detail
    assert isinstance(error.modeled_error.error_message, str) and error.modeled_error.error_message, detail

    # Nothing was provisioned: no thing, and the certificate is still waiting.
    reg = emulator.registry()
    dump = f"\nregistry: {json.dumps(reg, indent=1)}"
    assert f"demo-{serial}" not in {t["name"] for t in reg["things"]}, dump
    status = {c["id"]: c["status"] for c in reg["certificates"]}
    assert status.get(created.certificate_id) == "PENDING_ACTIVATION", dump


def aws_documented_claim_policy(template: str) -> dict:
    """The claim policy of AWS's fleet provisioning guide, unchanged: CreateKeysAndCertificate
    and RegisterThing of one template, nothing for CreateCertificateFromCsr."""
    arn = "arn:aws:iot:us-east-1:123456789012"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
                f"{arn}:topic/$aws/certificates/create/*",
                f"{arn}:topic/$aws/provisioning-templates/{template}/provision/*"]},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
                f"{arn}:topicfilter/$aws/certificates/create/*",
                f"{arn}:topicfilter/$aws/provisioning-templates/{template}/provision/*"]},
        ],
    }


@pytest.mark.parametrize("protocol", ["mqtt311", "mqtt5"])
@EC_KEYS
def test_claim_policy_without_csr_topics_fails_create_from_csr(emulator, protocol):
    """The common field failure: AWS's claim policy used unchanged with CreateCertificateFromCsr.
    The emulator refuses the reply subscription as AWS does, the SDK's request fails with a
    transport error (not a service rejection), and CreateKeysAndCertificate still works."""
    wait = Waiter(emulator)
    (emulator.data_dir / "claim-policy.json").write_text(json.dumps(aws_documented_claim_policy(TEMPLATE)))
    serial = f"{protocol}-policy-{uuid.uuid4().hex[:12]}"
    key = new_key("ec")
    with DEVICES[protocol](emulator, emulator.claim_pem, emulator.claim_key, client_id=f"claim-{serial}") as claim:
        identity = claim.identity_client()
        future = identity.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=make_csr(key, serial))
        )
        try:
            outcome = future.result(TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise AssertionError(
                f"CreateCertificateFromCsr over {claim.protocol}: no answer within {TIMEOUT} s" + emulator.context()
            ) from None
        except V2ServiceException as e:
            detail = describe_error(e) + emulator.context()
            assert e.modeled_error is None, detail
            assert e.inner_error is not None, detail
        else:
            raise AssertionError(f"CreateCertificateFromCsr was accepted: {outcome!r}" + emulator.context())
        assert emulator.wait_for_stderr("iot:Subscribe", "create-from-csr", "denied"), (
            "the emulator does not log the denied subscription" + emulator.context()
        )
    # What the policy allows still works (on a new connection: the SDK's request-response client
    # keeps its refused subscriptions for a while).
    with DEVICES[protocol](emulator, emulator.claim_pem, emulator.claim_key, client_id=f"claim2-{serial}") as claim:
        identity = claim.identity_client()
        created = wait(
            identity.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()),
            f"CreateKeysAndCertificate over {claim.protocol}",
        )
        assert created.certificate_ownership_token
