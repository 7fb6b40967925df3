"""MQTT 5 (the default) and 3.1.1 against the emulator: both certificate APIs provision over
3.1.1, ``mqtt_version`` is checked, and over MQTT 5 a policy denial arrives as a reason code."""

from __future__ import annotations

import json

import pytest

import fleetprov

ARN = "arn:aws:iot:us-east-1:123456789012"


@pytest.mark.parametrize(
    ("use_csr", "payload_format"), [(True, "cbor"), (False, "json")], ids=["csr-cbor", "keys-json"]
)
def test_provision_over_mqtt_3_1_1(emulator, tmp_path, use_csr, payload_format):
    serial = f"v311-{int(use_csr)}-{payload_format}"
    result = fleetprov.provision(
        **emulator.kwargs(
            template_name="DemoTemplate",
            parameters={"SerialNumber": serial},
            use_csr=use_csr,
            payload_format=payload_format,
            output_dir=tmp_path / "creds",
            mqtt_version="3.1.1",
        )
    )
    assert result.thing_name == f"demo-{serial}"
    assert result.attempts == 1


def test_mqtt_version_is_checked(emulator):
    kwargs = emulator.kwargs(template_name="DemoTemplate")
    with pytest.raises(fleetprov.InvalidArgumentError, match="unknown MQTT version 4"):
        fleetprov.provision(**kwargs, mqtt_version=4)
    with pytest.raises(TypeError, match="mqtt_version"):
        fleetprov.provision(**kwargs, mqtt_version=5.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mqtt_version"):
        fleetprov.provision(**kwargs, mqtt_version=True)


def _deny_connect(emulator) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Subscribe", "iot:Receive"], "Resource": "*"}
        ],
    }
    (emulator.data_dir / "claim-policy.json").write_text(json.dumps(policy))


def test_a_denied_connect_is_a_reason_code_over_mqtt_5(emulator, tmp_path):
    _deny_connect(emulator)
    with pytest.raises(fleetprov.FleetprovConnectionError) as info:
        fleetprov.provision(
            **emulator.kwargs(
                template_name="DemoTemplate",
                parameters={"SerialNumber": "denied"},
                output_dir=tmp_path / "creds",
            )
        )
    e = info.value
    assert e.mqtt_reason_code == 0x87
    assert e.mqtt_reason_string == ""
    assert not e.retryable
    assert "CONNACK reason code 0x87 (not authorized)" in e.message
    assert "iot:Connect" in e.message
    assert "(1 attempt," in e.message
    assert not (tmp_path / "creds").exists()


def test_the_same_denial_over_mqtt_3_1_1_is_a_closed_connection(emulator, tmp_path):
    _deny_connect(emulator)
    with pytest.raises(fleetprov.FleetprovConnectionError) as info:
        fleetprov.provision(
            **emulator.kwargs(
                template_name="DemoTemplate",
                parameters={"SerialNumber": "denied-311"},
                mqtt_version="3.1.1",
                retry=fleetprov.Retry(max_attempts=1),
            )
        )
    # AWS IoT closes a 3.1.1 connection it does not allow, without a CONNACK: no code to give.
    assert info.value.mqtt_reason_code is None
    assert info.value.retryable
