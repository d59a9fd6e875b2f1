"""The SMTP listener's TLS certificate: the configured one, or a self-signed one made once."""

from __future__ import annotations

import datetime
import fcntl
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postbode.config import Settings

log = logging.getLogger(__name__)


def self_signed(hostname: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `hostname`, valid for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_paths(settings: Settings) -> tuple[Path, Path]:
    """The configured certificate and key (smtp_tls_cert, smtp_tls_key: the same files on
    every node), or, as the single-node default, a self-signed pair made once in the data
    directory."""
    if settings.smtp_tls_cert and settings.smtp_tls_key:
        return settings.smtp_tls_cert, settings.smtp_tls_key
    if settings.sqlalchemy_url.startswith("postgresql"):
        # Several nodes: each would make its own, and a client pinning one sees another.
        log.warning(
            "no POSTBODE_SMTP_TLS_CERT/POSTBODE_SMTP_TLS_KEY: this node offers STARTTLS with a "
            "self-signed certificate of its own; configure files shared by every node"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cert_path = settings.data_dir / "smtp-cert.pem"
    key_path = settings.data_dir / "smtp-key.pem"
    with open(settings.data_dir / "smtp-cert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several smtp processes may start at once
        if not cert_path.exists():
            cert, key = self_signed(settings.smtp_hostname)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            cert_path.write_bytes(cert)
    return cert_path, key_path


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context STARTTLS uses."""
    cert, key = certificate_paths(settings)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
