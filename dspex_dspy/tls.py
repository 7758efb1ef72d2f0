"""Transport security of the bridge: TLS material for servers, and how clients open their channels.

A server is given a :class:`ServerTLS` (certificate chain and key, plus a client CA to require
mutual TLS) and serves through gRPC's own SSL credentials. A client describes its side with a
:class:`ChannelSecurity` (trusted root certificates, an optional client certificate, and a bearer
token); :func:`secure_channel` and :func:`secure_aio_channel` open the channel it describes: TLS
through gRPC's own SSL credentials when root certificates are given, and the token attached to
every call as ``authorization: Bearer ...`` metadata by a client interceptor. (gRPC Python's call
credentials run a Python plugin on a fresh thread per call, which would cost more than the call
itself; the interceptor sends the same header at no measurable cost.) A token is never sent in
clear to a host other than loopback. Without any of these a channel is the plain insecure one.
:func:`resolve_security` fills what a caller left out from ``DSPEX_BRIDGE_CA`` (a PEM path),
``DSPEX_BRIDGE_CERT`` / ``DSPEX_BRIDGE_KEY`` and ``DSPEX_BRIDGE_TOKEN``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import grpc

from dspex_dspy.errors import BridgeUnavailableError, ValidationError

__all__ = [
    "CA_ENV",
    "CERT_ENV",
    "KEY_ENV",
    "TOKEN_ENV",
    "ChannelSecurity",
    "Pem",
    "ServerTLS",
    "channel_credentials",
    "is_loopback",
    "read_pem",
    "resolve_security",
    "secure_aio_channel",
    "secure_channel",
]

CA_ENV: Final = "DSPEX_BRIDGE_CA"
"""Path of a PEM file of root certificates clients trust (turns TLS on)."""
CERT_ENV: Final = "DSPEX_BRIDGE_CERT"
"""Path of a client certificate chain (PEM), for bridges that require mutual TLS."""
KEY_ENV: Final = "DSPEX_BRIDGE_KEY"
"""Path of the private key (PEM) of that client certificate."""
TOKEN_ENV: Final = "DSPEX_BRIDGE_TOKEN"
"""A bearer token clients send on every call."""

Pem = bytes | str | os.PathLike[str]
"""PEM material: its bytes, its text (starting ``-----BEGIN``), or the path of a file holding it."""


def read_pem(material: Pem, what: str) -> bytes:
    """Return PEM bytes from bytes, PEM text or a file path.

    Raises:
        ValidationError: the file cannot be read, or holds no PEM block.
    """
    if isinstance(material, bytes):
        data = material
    elif isinstance(material, str) and material.lstrip().startswith("-----BEGIN"):
        data = material.encode()
    else:
        try:
            data = Path(material).read_bytes()
        except OSError as exc:
            raise ValidationError(
                "", what, None, f"cannot read the {what} file {os.fspath(material)}: {exc.strerror}"
            ) from None
    if b"-----BEGIN" not in data:
        raise ValidationError("", what, None, f"the {what} is not PEM data (no '-----BEGIN' line)")
    return data


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, brackets allowed) is this machine's loopback.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host.removeprefix("ipv4:").removeprefix("ipv6:")


def _all_loopback(address: str) -> bool:
    """Whether every host of a target (one address, or an ``ipv4:``/``ipv6:`` list) is loopback."""
    return all(is_loopback(_host_of(part)) for part in address.removeprefix("ipv4:").removeprefix("ipv6:").split(","))


@dataclass(frozen=True)
class ServerTLS:
    """A server's TLS material (PEM bytes).

    Attributes:
        certificate_chain: the server's certificate chain.
        private_key: its private key.
        client_ca: root certificates of client certificates; when set, every client must present
            a certificate signed by them (mutual TLS).
    """

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cert: Pem, key: Pem, client_ca: Pem | None = None) -> ServerTLS:
        """Read the material from bytes, PEM text or file paths."""
        return cls(
            read_pem(cert, "tls certificate"),
            read_pem(key, "tls key"),
            read_pem(client_ca, "tls client CA") if client_ca is not None else None,
        )

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """The gRPC server credentials for this material."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def __repr__(self) -> str:
        return f"ServerTLS(mutual={self.mutual})"


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client secures its channel to a bridge. The token never appears in its repr.

    Attributes:
        root_certificates: PEM root certificates to trust; None = plaintext.
        certificate_chain: a client certificate chain (PEM), for mutual TLS.
        private_key: the private key of that certificate (PEM).
        token: a bearer token sent on every call.
    """

    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        """Whether the channel uses TLS."""
        return self.root_certificates is not None

    @property
    def plain(self) -> bool:
        """Whether this is the plain insecure channel (no TLS, no token)."""
        return not self.tls and not self.token

    def __repr__(self) -> str:
        client = ", client certificate" if self.certificate_chain else ""
        return f"ChannelSecurity(tls={self.tls}{client}, token={'set' if self.token else 'none'})"


def resolve_security(
    root_certificates: Pem | None = None,
    token: str | None = None,
    *,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
) -> ChannelSecurity:
    """Build a :class:`ChannelSecurity` from arguments, falling back on the environment.

    Each argument left as None is taken from its environment variable (:data:`CA_ENV`,
    :data:`TOKEN_ENV`, :data:`CERT_ENV`, :data:`KEY_ENV`) when that is set.

    Raises:
        ValidationError: unreadable PEM material, a certificate without its key (or the other
            way round), or a token that is not a non-empty string.
    """
    ca = root_certificates if root_certificates is not None else os.environ.get(CA_ENV) or None
    cert = certificate_chain if certificate_chain is not None else os.environ.get(CERT_ENV) or None
    key = private_key if private_key is not None else os.environ.get(KEY_ENV) or None
    bearer = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if (cert is None) != (key is None):
        raise ValidationError("", "tls", None, "a client certificate needs its private key, and a key its certificate")
    if cert is not None and ca is None:
        raise ValidationError("", "tls", None, "a client certificate is only used over TLS: give root certificates too")
    if bearer is not None and (not isinstance(bearer, str) or not bearer.strip()):
        raise ValidationError("", "token", None, "a token must be a non-empty string")
    return ChannelSecurity(
        root_certificates=read_pem(ca, "tls CA") if ca is not None else None,
        certificate_chain=read_pem(cert, "tls client certificate") if cert is not None else None,
        private_key=read_pem(key, "tls client key") if key is not None else None,
        token=bearer.strip() if bearer is not None else None,
    )


def channel_credentials(address: str, security: ChannelSecurity) -> grpc.ChannelCredentials | None:
    """The transport credentials of a channel to ``address``: TLS, or None for plaintext.

    Raises:
        BridgeUnavailableError: a token would travel in clear to a host other than loopback.
    """
    if security.tls:
        return grpc.ssl_channel_credentials(
            root_certificates=security.root_certificates,
            private_key=security.private_key,
            certificate_chain=security.certificate_chain,
        )
    if security.token and not _all_loopback(address):
        raise BridgeUnavailableError(
            f"refusing to send a token in clear to {address}: give root certificates (root_certificates= "
            f"or {CA_ENV}) so the channel uses TLS"
        )
    return None


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _with_token(details: Any, header: tuple[str, str]) -> _CallDetails:
    return _CallDetails(
        details.method,
        details.timeout,
        (*(details.metadata or ()), header),
        details.credentials,
        details.wait_for_ready,
        getattr(details, "compression", None),
    )


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self._header), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self._header), request)


def _aio_with_token(details: Any, header: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_aio_with_token(details, self._header), request)


class _AioStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_aio_with_token(details, self._header), request)


def secure_channel(
    address: str, security: ChannelSecurity, options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.Channel, grpc.Channel]:
    """Open a blocking channel to ``address`` as ``security`` says.

    Returns:
        ``(transport, channel)``: the bare channel (to wait on its readiness) and the one to make
        stubs on, which adds the token to every call (the same object when there is no token).

    Raises:
        BridgeUnavailableError: a token would travel in clear to a host other than loopback.
    """
    credentials = channel_credentials(address, security)
    if credentials is None:
        transport = grpc.insecure_channel(address, options=options)
    else:
        transport = grpc.secure_channel(address, credentials, options=options)
    if not security.token:
        return transport, transport
    return transport, grpc.intercept_channel(transport, _BearerToken(security.token))


def secure_aio_channel(
    address: str, security: ChannelSecurity, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """Open a ``grpc.aio`` channel to ``address`` as ``security`` says (see :func:`secure_channel`).

    Raises:
        BridgeUnavailableError: a token would travel in clear to a host other than loopback.
    """
    credentials = channel_credentials(address, security)
    interceptors: Any = [_AioUnaryToken(security.token), _AioStreamToken(security.token)] if security.token else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
