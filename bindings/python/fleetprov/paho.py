"""paho-mqtt as the MQTT stack of a :class:`fleetprov.HostFlow`.

Needs paho-mqtt 2.x (``pip install 'paho-mqtt>=2,<3'``), an optional dependency imported only
by this module. One call::

    from fleetprov.paho import provision_with_paho

    result = provision_with_paho(
        endpoint="abc123-ats.iot.eu-west-1.amazonaws.com",
        ca_file="AmazonRootCA1.pem", cert_file="claim.pem", key_file="claim.key",
        template_name="DemoTemplate", parameters={"SerialNumber": "0001"},
        output_dir="/var/lib/device",
    )

or, to shape the paho clients (logger, protocol, proxy) or drive the flow yourself::

    with PahoTransport(endpoint, 8883, ca_file=..., cert_file=..., key_file=...,
                       client_factory=my_factory) as transport, \\
         fleetprov.HostFlow(transport=transport, template_name=..., parameters=...) as flow:
        result = transport.run(flow)

The library never opens a socket here: paho does, with TLS set up by this module.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt import __version__ as _PAHO_VERSION
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fleetprov.paho needs paho-mqtt 2.x: pip install 'paho-mqtt>=2,<3'") from e

if not _PAHO_VERSION.startswith("2."):  # pragma: no cover
    raise ImportError(f"fleetprov.paho needs paho-mqtt 2.x, found {_PAHO_VERSION}")

from ._api import (
    DEFAULT_FORMAT,
    DEFAULT_KEY_TYPE,
    DEFAULT_PORT,
    DEFAULT_STEP_TIMEOUT,
    DEFAULT_TIMEOUT,
    Format,
    KeyType,
    ProgressCallback,
    ProvisionResult,
    Retry,
    StrPath,
    _int_arg,
)
from ._host import HostFlow, Identity
from .errors import InvalidArgumentError

__all__ = ["PahoTransport", "provision_with_paho", "default_client", "ClientFactory"]

logger = logging.getLogger("fleetprov.paho")

#: A client factory: given the MQTT client id, returns a new, unconnected paho client made with
#: ``CallbackAPIVersion.VERSION2`` and without TLS (the transport sets TLS and the callbacks).
ClientFactory = Callable[[str], "mqtt.Client"]


#: The ALPN protocol name of MQTT over TLS on port 443 with AWS IoT.
ALPN_PROTOCOL = "x-amzn-mqtt-ca"


def default_client(client_id: str) -> "mqtt.Client":
    """A paho client for one connection: MQTT 3.1.1, clean session, callback API version 2."""
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )


class _Link:
    """One paho client and the connection the flow asked for with it."""

    def __init__(self, client: "mqtt.Client", identity: Identity) -> None:
        self.client = client
        self.claim = identity.claim
        #: "connecting" until CONNACK, "up", then "closed" (no event reaches the flow any more).
        self.state = "connecting"
        #: The first TLS error seen on the socket (a refused client certificate shows up after
        #: the handshake with TLS 1.3, when the server's alert is read).
        self.tls_error: Optional[ssl.SSLError] = None
        self.sub_mid: Optional[int] = None


_NOT_TLS_FAILURES = (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError, ssl.SSLEOFError)


def _watching_socket_class(link: _Link) -> type[ssl.SSLSocket]:
    """An SSLSocket class (SSLContext.sslsocket_class) that notes TLS errors on `link`."""

    def note(e: ssl.SSLError) -> None:
        if link.tls_error is None and not isinstance(e, _NOT_TLS_FAILURES):
            link.tls_error = e

    class WatchingSocket(ssl.SSLSocket):
        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as e:
                note(e)
                raise

        def send(self, data: Any, flags: int = 0) -> int:
            try:
                return super().send(data, flags)
            except ssl.SSLError as e:
                note(e)
                raise

    return WatchingSocket


def _str_arg(value: Any, name: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    return value


class PahoTransport:
    """A :class:`fleetprov.HostTransport` over paho-mqtt 2.x, driven on the caller's thread.

    Each connection the flow asks for gets a new paho client (paho configures TLS once per
    client) from ``client_factory`` (default :func:`default_client`), with TLS to
    ``endpoint:port`` trusting ``ca_file`` or ``ca_pem`` (default: the system roots) and the
    server name checked. Claim connections use ``cert_file``/``key_file`` (or
    ``cert_pem``/``key_pem``) and the MQTT client id ``client_id`` (default: a random
    ``fleetprov-…``); connections with the new certificate use the certificate, key and client
    id (the thing name) the flow gives. Keys that are not already in files are written to a
    private temporary directory (0700, files 0600) only for the moment
    :meth:`ssl.SSLContext.load_cert_chain` reads them; the directory goes with :meth:`close`.

    paho's network loop runs inside :meth:`run` (or :meth:`pump`), on the calling thread, as
    ``client.loop(timeout)`` calls bounded by the flow's :attr:`HostFlow.wake_at`; paho's
    ``on_connect``, ``on_disconnect``, ``on_subscribe`` and ``on_message`` become the flow's
    events there. The blocking part of a connect (TCP and TLS handshake, at most
    ``connect_timeout`` seconds) runs in :meth:`pump`, never inside a flow callback; its errors
    take the place of paho's ``on_connect_fail`` (which only ``loop_forever`` calls). A TLS
    error before CONNACK — with TLS 1.3 a refused client certificate shows up when the server's
    alert is read, after the handshake — is reported as ``connect_failed(tls=True)``.
    Exceptions raised while handling paho's callbacks (by the flow, ``on_progress`` included)
    propagate out of :meth:`run`. A PahoTransport belongs to the thread driving it.

    ALPN ``x-amzn-mqtt-ca`` (which AWS IoT requires for MQTT on port 443) is offered when
    ``alpn`` is True, and by default (None) exactly when ``port`` is 443, as the library's own
    transport does.

    Use as a context manager: :meth:`close` closes the connections and removes the directory.
    """

    #: The longest single wait for network events, in seconds.
    MAX_WAIT = 0.25

    def __init__(
        self,
        endpoint: str,
        port: int = DEFAULT_PORT,
        *,
        ca_file: Optional[StrPath] = None,
        ca_pem: Optional[str] = None,
        cert_file: Optional[StrPath] = None,
        key_file: Optional[StrPath] = None,
        cert_pem: Optional[str] = None,
        key_pem: Optional[str] = None,
        keep_alive: int = 60,
        connect_timeout: float = 10.0,
        client_factory: Optional[ClientFactory] = None,
        client_id: Optional[str] = None,
        alpn: Optional[bool] = None,
    ) -> None:
        self._dir: Optional[Path] = None
        self._closed = False
        self._link: Optional[_Link] = None
        self._closing: list[_Link] = []
        self._pending: Optional[Identity] = None
        self._flow: Optional[HostFlow] = None
        self._host = _str_arg(endpoint, "endpoint")
        if not self._host:
            raise InvalidArgumentError("endpoint is empty", code=1)
        self._port = _int_arg(port, "port", 1, 65535)
        self._ca_file = None if ca_file is None else _str_arg(ca_file, "ca_file")
        self._ca_pem = None if ca_pem is None else _str_arg(ca_pem, "ca_pem")
        if self._ca_file is not None and self._ca_pem is not None:
            raise InvalidArgumentError("give ca_file or ca_pem, not both", code=1)
        if (cert_file is None) != (key_file is None) or (cert_pem is None) != (key_pem is None):
            raise InvalidArgumentError("claim credentials need both a certificate and a key", code=1)
        if (cert_file is None) == (cert_pem is None):
            raise InvalidArgumentError("give the claim credentials: cert_file/key_file or cert_pem/key_pem", code=1)
        self._claim_files = None if cert_file is None else (_str_arg(cert_file, "cert_file"), _str_arg(key_file, "key_file"))
        self._claim_pem = None if cert_pem is None else (_str_arg(cert_pem, "cert_pem"), _str_arg(key_pem, "key_pem"))
        self._keep_alive = _int_arg(keep_alive, "keep_alive", 1, 65535)
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
            raise InvalidArgumentError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}", code=1)
        self._connect_timeout = float(connect_timeout)
        if client_factory is not None and not callable(client_factory):
            raise TypeError("client_factory must be callable")
        self._factory: ClientFactory = client_factory or default_client
        self._client_id = None if client_id is None else _str_arg(client_id, "client_id")
        if alpn is not None and not isinstance(alpn, bool):
            raise TypeError("alpn must be bool or None")
        self._alpn = self._port == 443 if alpn is None else alpn

    # -- lifetime --
    def __enter__(self) -> "PahoTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def workdir(self) -> Optional[Path]:
        """The private directory for key files (None until a key had to be written)."""
        return self._dir

    def close(self) -> None:
        """Closes every connection and removes the private directory. Idempotent."""
        self._closed = True
        self._pending = None
        self.disconnect()
        self._flush_closing()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def attach(self, flow: HostFlow) -> None:
        """Sends paho's events to `flow` (:meth:`run` does this)."""
        if not isinstance(flow, HostFlow):
            raise TypeError(f"flow must be a fleetprov.HostFlow, not {type(flow).__name__}")
        self._flow = flow

    # -- HostTransport: called by the flow, inside its calls --
    def connect(self, identity: Identity) -> None:
        """Drops the current connection; the new one is opened by the next :meth:`pump`."""
        self.disconnect()
        if self._closed:
            raise RuntimeError("this PahoTransport has been closed")
        self._pending = identity

    def disconnect(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.state = "closed"
            link.client.disconnect()  # queued DISCONNECT; the socket is closed by _flush_closing
            self._closing.append(link)

    def subscribe(self, filters: list[str]) -> bool:
        link = self._link
        if link is None or link.state != "up":
            return False
        rc, mid = link.client.subscribe([(f, 1) for f in filters])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        link.sub_mid = mid
        return True

    def publish(self, topic: str, payload: bytes) -> bool:
        link = self._link
        if link is None or link.state != "up":
            return False
        return link.client.publish(topic, payload, qos=1, retain=False).rc == mqtt.MQTT_ERR_SUCCESS

    # -- driving --
    def run(self, flow: HostFlow, *, timeout: Optional[float] = None) -> ProvisionResult:
        """Starts `flow` (unless started) and drives it until it finishes: returns its result or
        raises its failure. ``timeout`` (seconds, None: none) bounds this loop on top of the
        flow's own deadline, raising the builtin :class:`TimeoutError`."""
        self.attach(flow)
        if not flow.started:
            flow.start()
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            self._perform()
            result = flow.result()
            if result is not None:
                return result
            now = time.monotonic()
            if limit is not None and now >= limit:
                raise TimeoutError(f"the provisioning flow did not finish within {timeout} s")
            wake = flow.wake_at
            wait = self.MAX_WAIT if wake is None else min(max(wake - now, 0.0), self.MAX_WAIT)
            self._wait(wait)
            flow.tick()

    def pump(self, timeout: float) -> None:
        """One turn of the network loop: opens the connection the flow asked for (blocking up
        to ``connect_timeout``), then handles network events for up to `timeout` seconds (or
        waits that long when there is no connection). Call :meth:`HostFlow.tick` after it."""
        self._perform()
        self._wait(timeout)

    def _events(self) -> HostFlow:
        if self._flow is None:
            raise RuntimeError("no HostFlow attached to this PahoTransport (attach() or run())")
        return self._flow

    def _perform(self) -> None:
        self._flush_closing()
        identity, self._pending = self._pending, None
        if identity is not None:
            self._open(identity)
            self._flush_closing()

    def _wait(self, timeout: float) -> None:
        link = self._link
        if link is None:
            # No connection: the flow waits for its own timer (a retry pause); nothing else can
            # happen until then.
            time.sleep(timeout)
            return
        rc = link.client.loop(timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS and link is self._link and link.state != "closed":
            self._lost(link)  # paho reported no on_disconnect for it (e.g. no socket)
        self._flush_closing()

    def _open(self, identity: Identity) -> None:
        flow = self._events()
        client_id = identity.client_id or self._client_id or f"fleetprov-{uuid.uuid4().hex[:16]}"
        client = self._factory(client_id)
        link = _Link(client, identity)
        client.tls_set_context(self._context(identity, link))
        client.connect_timeout = self._connect_timeout
        client.on_connect = lambda _c, _u, _flags, rc, _props: self._on_connect(link, rc)
        client.on_disconnect = lambda _c, _u, _flags, _rc, _props: self._on_disconnect(link)
        client.on_subscribe = lambda _c, _u, mid, rcs, _props: self._on_subscribe(link, mid, rcs)
        client.on_message = lambda _c, _u, msg: self._on_message(link, msg)
        self._link = link
        kind = "claim" if identity.claim else "new"
        logger.debug("connecting to %s:%d as %r with the %s certificate", self._host, self._port, client_id, kind)
        try:
            client.connect(self._host, self._port, keepalive=self._keep_alive)
        except OSError as e:  # ssl.SSLError and socket errors
            logger.debug("connect() to %s:%d failed: %s", self._host, self._port, e)
            if link is self._link and link.state == "connecting":
                link.tls_error = link.tls_error or (e if isinstance(e, ssl.SSLError) else None)
                self._lost(link)

    def _context(self, identity: Identity, link: _Link) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self._ca_file, cadata=self._ca_pem)
        if identity.claim:
            if self._claim_files is not None:
                ctx.load_cert_chain(*self._claim_files)
            else:
                assert self._claim_pem is not None
                self._load_pem(ctx, *self._claim_pem)
        else:
            if identity.certificate_pem is None or identity.private_key_pem is None:
                raise InvalidArgumentError(
                    "the flow asked to connect with a certificate whose key it does not hold "
                    "(external CSR); PahoTransport needs the key", code=1,
                )
            self._load_pem(ctx, identity.certificate_pem, identity.private_key_pem)
        if self._alpn:
            ctx.set_alpn_protocols([ALPN_PROTOCOL])
        ctx.sslsocket_class = _watching_socket_class(link)
        return ctx

    def _load_pem(self, ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
        with self._key_files(cert_pem, key_pem) as (cert_path, key_path):
            ctx.load_cert_chain(cert_path, key_path)

    @contextmanager
    def _key_files(self, cert_pem: str, key_pem: str) -> Iterator[tuple[str, str]]:
        """The PEMs as files in the private directory (0700, files 0600), removed on exit."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fleetprov-paho-"))  # 0700
        stem = uuid.uuid4().hex
        paths = [str(self._dir / f"{stem}.crt"), str(self._dir / f"{stem}.key")]
        try:
            for path, text in zip(paths, (cert_pem, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
            yield paths[0], paths[1]
        finally:
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _flush_closing(self) -> None:
        """Sends the queued DISCONNECT of closed connections and closes their sockets."""
        closing, self._closing = self._closing, []
        for link in closing:
            client = link.client
            if client.socket() is not None:
                client.loop_write()  # paho closes the socket once DISCONNECT is out
            sock = client.socket()
            if sock is not None:
                sock.close()  # could not be sent (e.g. the connection is gone)

    # -- paho's callbacks (on the thread running the loop) --
    def _lost(self, link: _Link) -> None:
        was = link.state
        link.state = "closed"
        if self._link is link:
            self._link = None
        self._closing.append(link)
        if was == "connecting":
            if link.tls_error is not None:
                logger.info("TLS failed on the connection with the %s certificate: %s",
                            "claim" if link.claim else "new", link.tls_error)
            self._events().connect_failed(link.tls_error is not None)
        elif was == "up":
            self._events().disconnected()

    def _on_connect(self, link: _Link, reason: Any) -> None:
        if link is not self._link or link.state != "connecting":
            return
        if reason.is_failure:
            logger.info("%s:%d refused the connection: %s", self._host, self._port, reason)
            self._lost(link)
            return
        link.state = "up"
        self._events().connected()

    def _on_disconnect(self, link: _Link) -> None:
        if link is self._link and link.state != "closed":
            self._lost(link)

    def _on_subscribe(self, link: _Link, mid: int, reasons: list[Any]) -> None:
        if link is not self._link or link.state != "up" or mid != link.sub_mid:
            return
        link.sub_mid = None
        # The return codes as they came (0-2 granted, 0x80 and above refused).
        self._events().suback([int(r.value) for r in reasons])

    def _on_message(self, link: _Link, msg: "mqtt.MQTTMessage") -> None:
        if link is not self._link or link.state != "up":
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return  # not a topic of the flow's
        self._events().message(topic, msg.payload)


def provision_with_paho(
    *,
    endpoint: str,
    port: int = DEFAULT_PORT,
    ca_file: Optional[StrPath] = None,
    cert_file: Optional[StrPath] = None,
    key_file: Optional[StrPath] = None,
    template_name: str,
    parameters: Optional[Mapping[str, str]] = None,
    use_csr: bool = True,
    payload_format: Union[str, Format] = DEFAULT_FORMAT,
    output_dir: Optional[StrPath] = None,
    state_dir: Optional[StrPath] = None,
    retry: Optional[Retry] = None,
    token_lifetime: Optional[int] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    verify: bool = True,
    key_type: Union[str, KeyType] = DEFAULT_KEY_TYPE,
    on_progress: Optional[ProgressCallback] = None,
    ca_pem: Optional[str] = None,
    cert_pem: Optional[str] = None,
    key_pem: Optional[str] = None,
    keep_alive: int = 60,
    connect_timeout: float = 10.0,
    client_factory: Optional[ClientFactory] = None,
    client_id: Optional[str] = None,
    alpn: Optional[bool] = None,
) -> ProvisionResult:
    """:func:`fleetprov.provision` with paho-mqtt as the MQTT stack: the same arguments and
    result, the same exceptions, the same flow (retries, resume journal, verification, commit)
    as a :class:`fleetprov.HostFlow` over a :class:`PahoTransport` driven on this thread.
    ``client_id`` is the claim connection's MQTT client id (the new certificate connects as the
    thing); ``keep_alive`` (seconds), ``connect_timeout``, ``client_factory`` and ``alpn`` shape
    the paho clients (see :class:`PahoTransport`).
    """
    with PahoTransport(
        endpoint, port, ca_file=ca_file, ca_pem=ca_pem, cert_file=cert_file, key_file=key_file,
        cert_pem=cert_pem, key_pem=key_pem, keep_alive=keep_alive, connect_timeout=connect_timeout,
        client_factory=client_factory, client_id=client_id, alpn=alpn,
    ) as transport, HostFlow(
        transport=transport, endpoint=endpoint, template_name=template_name, parameters=parameters,
        use_csr=use_csr, payload_format=payload_format, output_dir=output_dir, state_dir=state_dir,
        retry=retry, token_lifetime=token_lifetime, timeout=timeout, step_timeout=step_timeout,
        verify=verify, key_type=key_type, on_progress=on_progress,
    ) as flow:
        # The flow ends by its own deadline; this bound only guards against a stuck loop.
        guard = None if not timeout else timeout + step_timeout + connect_timeout + 5.0
        return transport.run(flow, timeout=guard)
