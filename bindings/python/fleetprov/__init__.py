"""fleetprov: AWS IoT Core fleet provisioning over MQTT, via the libfleetprov C library.

One call::

    result = fleetprov.provision(
        endpoint="abc123-ats.iot.eu-west-1.amazonaws.com",
        ca_file="AmazonRootCA1.pem", cert_file="claim.pem", key_file="claim.key",
        template_name="DemoTemplate", parameters={"SerialNumber": "0001"},
        output_dir="/var/lib/device",
        state_dir="/var/lib/device/provisioning",  # resume after a crash or a lost connection
        retry=fleetprov.Retry(max_attempts=5, initial_backoff=1.0, max_backoff=30.0),
        on_progress=lambda p: print(p.step.name, p.attempt, p.retry_in, p.error),
    )

Certificate rotation, with the credentials an earlier provision() wrote::

    result = fleetprov.rotate("/var/lib/device", endpoint=..., ca_file=...,
                              template_name="RotationTemplate", parameters={"ThingName": name})

Over an MQTT connection the caller owns: :class:`HostFlow` (any transport), or
:func:`fleetprov.paho.provision_with_paho` (paho-mqtt, an optional dependency).

Step by step::

    with fleetprov.Client(endpoint=..., cert_file=..., key_file=...,
                          template_name="DemoTemplate", parameters={...}) as c:
        cert = c.create_keys_and_certificate()
        reg = c.register_thing(cert)

In asyncio, ``await fleetprov.provision_async(...)``; cancelling the task cancels the flow.

Keys in a token (PKCS#11, TPM, secure element): ``claim_signer=`` with ``cert_file=`` and no key,
``device_signer=`` with ``device_public_key=`` (see :func:`provision`, :class:`SignatureScheme`).

Errors are :class:`FleetprovError` subclasses; log lines go to the ``fleetprov`` logger.
The shared library is the one ``FLEETPROV_LIBRARY`` names, else the one bundled in the wheel,
else the system's (see :mod:`fleetprov._ffi`).
"""

from __future__ import annotations

from ._ffi import EXPECTED_VERSION as __version__
from ._ffi import LIBRARY_PATH, LibraryLoadError, library_version
from ._api import (
    Certificate,
    ClaimSigner,
    Client,
    DeviceSigner,
    Format,
    KeyType,
    Progress,
    ProvisionOperation,
    ProvisionResult,
    Registration,
    Retry,
    Signature,
    SignatureScheme,
    Step,
    provision,
    provision_async,
    rotate,
)
from ._host import HostFlow, HostTransport, Identity
from .errors import (
    BufferTooSmallError,
    BusyError,
    CancelledError,
    CertificateMismatchError,
    ClosedError,
    DeadlineError,
    FleetprovConnectionError,
    FleetprovError,
    InvalidArgumentError,
    MalformedReplyError,
    PanicError,
    InternalError,
    InCallbackError,
    RejectedError,
    SignerError,
    StepTimeoutError,
    StorageError,
    SubscribeFailedError,
    TlsError,
    result_name,
)

__all__ = [
    "__version__",
    "LIBRARY_PATH",
    "LibraryLoadError",
    "library_version",
    "provision",
    "provision_async",
    "rotate",
    "HostFlow",
    "HostTransport",
    "Identity",
    "Client",
    "Certificate",
    "Registration",
    "ProvisionResult",
    "ProvisionOperation",
    "Progress",
    "Retry",
    "Step",
    "Format",
    "KeyType",
    "SignatureScheme",
    "Signature",
    "ClaimSigner",
    "DeviceSigner",
    "FleetprovError",
    "InvalidArgumentError",
    "TlsError",
    "FleetprovConnectionError",
    "StepTimeoutError",
    "DeadlineError",
    "RejectedError",
    "MalformedReplyError",
    "SubscribeFailedError",
    "CertificateMismatchError",
    "CancelledError",
    "StorageError",
    "BusyError",
    "BufferTooSmallError",
    "PanicError",
    "InternalError",
    "InCallbackError",
    "SignerError",
    "ClosedError",
    "result_name",
]
