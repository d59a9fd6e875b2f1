"""A bad setting stops any command at once: exit code 2, one line naming the setting and what
is wrong, no traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from postbode.testing.sink import self_signed_certificate

# Generous: what is asserted is that the command stops by itself (no crash loop, no hang); it
# normally takes about a second (the interpreter and the imports).
STOPS_WITHIN = 30.0


def postbode(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("POSTBODE_")},
        "POSTBODE_DATA_DIR": str(tmp_path / "data"),
        "POSTBODE_HTTP_PORT": "0",
        "POSTBODE_SMTP_PORT": "0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=STOPS_WITHIN,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "names", "says"),
    [
        ({"POSTBODE_TRANSPORT_MAP": "garbage"}, "POSTBODE_TRANSPORT_MAP", "not domain=host:port"),
        ({"POSTBODE_HTTP_PORT": "99999"}, "POSTBODE_HTTP_PORT", "less than or equal to 65535"),
        ({"POSTBODE_SMTP_PORT": "smtp"}, "POSTBODE_SMTP_PORT", "valid integer"),
        ({"POSTBODE_WORKERS": "-1"}, "POSTBODE_WORKERS", "greater than or equal to 0"),
        ({"POSTBODE_TLS_POLICY": "bank.test=always"}, "POSTBODE_TLS_POLICY", "unknown mode"),
        ({"POSTBODE_SHAPING_RULES": "gmail.test=conn"}, "POSTBODE_SHAPING_RULES", "conn"),
        ({"POSTBODE_DNS_NAMESERVERS": "ns.example"}, "POSTBODE_DNS_NAMESERVERS", "ns.example"),
        ({"POSTBODE_LOG_LEVEL": "loud"}, "POSTBODE_LOG_LEVEL", "'loud' is not one of"),
        ({"POSTBODE_SMTP_TLS_CERT": "/nonexistent.pem"}, "POSTBODE_SMTP_TLS_KEY", "together"),
    ],
)
def test_serve_stops_at_once_naming_the_bad_setting(
    tmp_path: Path, env: dict[str, str], names: str, says: str
) -> None:
    result = postbode(tmp_path, "serve", **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {names}: "), lines
    assert says in lines[0]
    assert "Traceback" not in result.stderr and not result.stdout
    assert not (tmp_path / "data").exists()  # nothing was started or created


def test_every_command_checks_the_settings(tmp_path: Path) -> None:
    result = postbode(tmp_path, "app", "list", POSTBODE_WORKERS="-3")
    assert result.returncode == 2
    assert result.stderr.startswith("error: POSTBODE_WORKERS: ")


def test_configured_tls_files_that_do_not_match_are_refused(tmp_path: Path) -> None:
    cert, _ = self_signed_certificate(("mx.one.test",))
    _, other_key = self_signed_certificate(("mx.two.test",))
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(other_key)
    result = postbode(
        tmp_path,
        "smtp",
        POSTBODE_SMTP_TLS_CERT=str(tmp_path / "cert.pem"),
        POSTBODE_SMTP_TLS_KEY=str(tmp_path / "key.pem"),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: POSTBODE_SMTP_TLS_CERT: ")
    assert "does not load" in result.stderr
