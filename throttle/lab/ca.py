"""The lab's certificate authority: one EC P-256 CA per lab, and leaf certificates for any name.

The lab server answers every SNI with a certificate for that name, so a client inside the lab that
trusts the lab CA (`/etc/netns/NAME-client/ssl/certs/ca-certificates.crt`) connects to
`https://pbs.twimg.com/` without `-k`, as a real user would: the censor then sees the same
handshake it would see on the internet. Every leaf certificate, the HTTPS server's and the HTTP/3
server's for any name, carries the one leaf key of the lab, so `leaf_spki` names the key every
certificate of the lab presents (what Chromium, whose QUIC ignores --ignore-certificate-errors, is
told to accept). Nothing here does network I/O.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.wire.names import normalise

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
LEAF_KEY = "leaf-key.pem"  # one key shared by every leaf: issuing a name is then one signature

_CA_DAYS = 3650
_LEAF_DAYS = 365
_SKEW = datetime.timedelta(days=1)  # clocks in a VM snapshot can be a little behind


@dataclass(frozen=True, slots=True)
class CAFiles:
    cert: Path
    key: Path
    leaf_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CAFiles:
        """The CA's files in `directory` (the lab's state directory), as `ensure_ca` makes them."""
        return cls(directory / CA_CERT, directory / CA_KEY, directory / LEAF_KEY)


def ensure_ca(directory: Path, label: str = "throttle") -> CAFiles:
    """The CA in `directory`, created if missing or unreadable; an existing valid one is reused."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = CAFiles.in_dir(directory)
    if files.cert.exists() and files.key.exists() and files.leaf_key.exists():
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            key = serialization.load_pem_private_key(files.key.read_bytes(), None)
            serialization.load_pem_private_key(files.leaf_key.read_bytes(), None)
            now = datetime.datetime.now(datetime.timezone.utc)
            if cert.public_key() == key.public_key() and cert.not_valid_after_utc > now + _SKEW:
                return files
        except (ValueError, TypeError, OSError):
            pass  # damaged: make a new one below
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "throttle lab"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"throttle lab CA ({label})"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    atomic_write(files.key, key.private_bytes(pem, pkcs8, none), 0o600)
    atomic_write(files.leaf_key, leaf_key.private_bytes(pem, pkcs8, none), 0o600)
    atomic_write(files.cert, cert.public_bytes(pem), 0o644)
    return files


def _ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ThrottleError(f"{path}: not the lab's EC key; remove the lab's state (throttle lab down) and try again")
    return key


def spki_sha256(key: CertificatePublicKeyTypes) -> str:
    """Base64 of the SHA-256 of a public key's DER SubjectPublicKeyInfo: the form of Chromium's
    --ignore-certificate-errors-spki-list (and of HPKP pins)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def leaf_spki(files: CAFiles) -> str:
    """`spki_sha256` of the lab's leaf key, which every leaf certificate `Issuer` signs carries."""
    return spki_sha256(_ec_key(files.leaf_key).public_key())


class Issuer:
    """Signs leaf certificates with the lab CA. Loaded once; `issue` is one ECDSA signature."""

    def __init__(self, files: CAFiles) -> None:
        self._ca_cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        self._ca_key = _ec_key(files.key)
        self._leaf_key = _ec_key(files.leaf_key)
        self.leaf_key_pem = files.leaf_key.read_bytes()
        self.ca_pem = files.cert.read_bytes()

    def issue(self, names: list[str]) -> bytes:
        """A PEM certificate chain (leaf, then CA) valid for `names` (DNS names or IP addresses).

        Raises ValueError for a name that cannot go in a certificate.
        """
        if not names:
            raise ValueError("a certificate needs at least one name")
        sans: list[x509.GeneralName] = []
        for raw in names:
            name = normalise(raw)
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                continue
            except ValueError:
                pass
            if not name or not name.isascii() or len(name) > 253:
                raise ValueError(f"{raw!r} is not a DNS name")
            sans.append(x509.DNSName(name))
        cn = normalise(names[0])[:64]
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem
