"""TLS material made at test time with ``cryptography``: a CA, a server and a client certificate.

Nothing is checked in: every run signs fresh keys, and a second, unrelated CA stands for "the
wrong CA".
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "Issued", "TlsMaterial", "make_material"]


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM bytes and as files."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its PEM certificate (and file) and what it signs with."""

    cert: bytes
    path: Path
    _key: ec.EllipticCurvePrivateKey
    _certificate: x509.Certificate


@dataclass(frozen=True)
class TlsMaterial:
    """A CA with a server and a client certificate it signed, and an unrelated CA."""

    ca: Authority
    server: Issued
    client: Issued
    other_ca: Authority


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _authority(directory: Path, label: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"dspex test {label}"))
        .issuer_name(_name(f"dspex test {label}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        # Key identifiers as RFC 5280 asks (Python 3.13's default TLS context is strict about them).
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    path = directory / f"{label}.pem"
    path.write_bytes(pem)
    return Authority(pem, path, key, cert)


def _issue(directory: Path, ca: Authority, label: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(label))
        .issuer_name(ca._certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca._key.public_key()), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    key_pem = _pem_key(key)
    cert_path, key_path = directory / f"{label}.crt", directory / f"{label}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key_pem)
    return Issued(cert, key_pem, cert_path, key_path)


def make_material(directory: Path) -> TlsMaterial:
    """Sign a fresh CA, server certificate (localhost, 127.0.0.1) and client certificate into ``directory``."""
    ca = _authority(directory, "ca")
    return TlsMaterial(
        ca=ca,
        server=_issue(directory, ca, "server", server=True),
        client=_issue(directory, ca, "client", server=False),
        other_ca=_authority(directory, "other-ca"),
    )
