"""STARTTLS on the SMTP listener with configured certificate files, the same on every node;
a self-signed certificate only as the single-node default."""

from __future__ import annotations

import logging
import smtplib
import ssl
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography import x509

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.tls import certificate_paths
from postbode.store.engine import Store
from postbode.testing.servers import SmtpListener
from postbode.testing.sink import self_signed_certificate

NAME = "mx.postbode.test"


def test_every_node_offers_the_configured_certificate(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    cert_pem, key_pem = self_signed_certificate((NAME,))
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "key.pem").chmod(0o600)
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    # Verified against the configured certificate (smtplib gives the address we connected
    # to as the server name, so the name is checked below instead).
    client = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    client.check_hostname = False
    expected = x509.load_pem_x509_certificate(cert_pem)
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                SmtpListener(
                    settings.model_copy(
                        update={
                            "data_dir": tmp_path / f"node{i}",
                            "smtp_hostname": NAME,
                            "smtp_tls_cert": tmp_path / "cert.pem",
                            "smtp_tls_key": tmp_path / "key.pem",
                        }
                    ),
                    store,
                )
            )
            for i in range(2)
        ]
        for node in nodes:
            with smtplib.SMTP(node.host, node.port, local_hostname="cms.shop.test") as smtp:
                smtp.starttls(context=client)
                sock = smtp.sock
                assert isinstance(sock, ssl.SSLSocket)
                offered = sock.getpeercert(binary_form=True)
                assert offered is not None
                assert x509.load_der_x509_certificate(offered) == expected
                smtp.login(shop.smtp_username, shop.smtp_password)
                refused = smtp.sendmail(
                    "orders@shop.test", ["ann@dest.test"], b"From: orders@shop.test\r\n\r\nHi\r\n"
                )
                assert refused == {}
    # Nothing self-signed was made beside them.
    assert not list(tmp_path.glob("node*/smtp-cert.pem"))


def test_a_single_node_makes_itself_a_self_signed_certificate_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, smtp_hostname=NAME)
    cert, key = certificate_paths(settings)
    assert cert == tmp_path / "smtp-cert.pem" and key.stat().st_mode & 0o077 == 0
    made = x509.load_pem_x509_certificate(cert.read_bytes())
    names = made.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [NAME]
    assert certificate_paths(settings) == (cert, key)
    assert x509.load_pem_x509_certificate(cert.read_bytes()) == made  # not made again


def test_several_nodes_without_configured_files_are_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://db.invalid/postbode")
    with caplog.at_level(logging.WARNING, logger="postbode.ingest.tls"):
        certificate_paths(settings)
    assert "configure files shared by every node" in caplog.text
