"""A private Postfix instance for tests: its own main.cf, queue, maillog and loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from postbode.testing.process import free_port

__all__ = [
    "Postfix",
    "PostfixError",
    "inline_map",
    "receiving_mx_config",
    "relay_config",
    "require_postfix",
]

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
POSTKICK = "/usr/sbin/postkick"
POSTLOG = "/usr/sbin/postlog"
SENDMAIL = "/usr/sbin/sendmail"
NOBODY_UID = 65534

# Every service runs unchrooted (5th column "n"): a chroot under a scratch directory lacks the
# libraries and name files Debian's init script would copy in.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """Postfix is missing, refused its configuration, or did not do what a test waited for."""


def require_postfix() -> None:
    """Fail loudly (not skip) when Postfix is not installed: CI installs it."""
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        installed = False
    else:
        installed = os.access(POSTFIX, os.X_OK)
    if not installed:
        raise PostfixError(
            f"{POSTFIX} not found: `DEBIAN_FRONTEND=noninteractive apt-get install -y postfix "
            "libsasl2-modules` (.ci/run does this)"
        )


def inline_map(entries: Mapping[str, str]) -> str:
    """A Postfix `inline:` lookup table, e.g. `inline:{ {a@x.test = 550 5.1.1 No}, ... }`."""
    for key, value in entries.items():
        if any(c in key + value for c in "{}\n") or "=" in key:
            raise ValueError(f"cannot write {key!r} = {value!r} in an inline: table")
    return "inline:{ " + ", ".join(f"{{{k} = {v}}}" for k, v in entries.items()) + " }"


def relay_config(
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    *,
    tls: str = "encrypt",
) -> dict[str, str]:
    """main.cf settings that send all mail to the relay [host]:port (an IP literal, so no
    lookup at all), with SMTP AUTH when a username is given. `tls="encrypt"` insists on
    STARTTLS without checking the certificate (for a self-signed peer); "verify" checks it."""
    relayhost = f"[{host}]:{port}"
    config = {"relayhost": relayhost, "smtp_tls_security_level": tls}
    if username is not None:
        if password is None or ":" in username:
            raise ValueError("SMTP AUTH needs a username without ':' and a password")
        config |= {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": inline_map({relayhost: f"{username}:{password}"}),
            # The default also has `noplaintext`, which would rule out PLAIN and LOGIN even
            # inside TLS: the only mechanisms a submission server usually offers.
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
        }
    return config


def receiving_mx_config(
    domains: Iterable[str],
    *,
    mailboxes: Iterable[str] | None = None,
    replies: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """main.cf settings that make the instance the MX of `domains`, storing accepted mail in
    Maildirs under its `mail_dir` (read them with `Postfix.mailbox()`).

    `mailboxes`: the addresses that exist; mail to others is accepted at SMTP time and then
    bounced by the virtual agent with a real DSN (`5.1.1 unknown user`) sent to the envelope
    sender through the relayhost. None: every address of the domains exists.
    `replies`: scripted SMTP answers by recipient, e.g. `{"defer@dest.test": "451 4.3.0 Later"}`.
    """
    config = {
        "virtual_mailbox_domains": ", ".join(domains),
        "virtual_uid_maps": f"static:{NOBODY_UID}",
        "virtual_gid_maps": f"static:{NOBODY_UID}",
    }
    if mailboxes is None:
        config["virtual_mailbox_maps"] = "static:inbox/"
    else:
        config["virtual_mailbox_maps"] = inline_map(
            {a: a.partition("@")[0] + "/" for a in mailboxes}
        )
        config["smtpd_reject_unlisted_recipient"] = "no"
    restrictions = ["permit_mynetworks", "reject"]
    if replies:
        restrictions.insert(0, f"check_recipient_access {inline_map(replies)}")
    config["smtpd_recipient_restrictions"] = ", ".join(restrictions)
    return config


class Postfix:
    """One private Postfix instance under `root` (default: a temporary directory of its own,
    removed on stop), listening for SMTP on `host:port` (loopback).

    `config` is main.cf as a dict, layered over a base that keeps the instance off the
    network (no DNS, no local delivery, loopback only) and quick to retry; see
    `relay_config()` and `receiving_mx_config()` for the usual roles. Example::

        with Postfix(config=relay_config("127.0.0.1", port, user, password)) as pf:
            pf.sendmail("orders@shop.test", ["alice@dest.test"], raw)
            pf.wait_queue_empty()
            assert "status=sent" in pf.maillog()
    """

    def __init__(
        self,
        root: Path | None = None,
        config: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "postfix.test",
    ) -> None:
        # The `postfix` user must reach every directory on the way to data/ and the queue,
        # which rules out pytest's tmp_path (under a 0700 directory): by default the instance
        # makes, and on stop() removes, its own directory.
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="postbode-postfix-")) if root is None else root
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.hostname = hostname
        self.config: dict[str, str] = dict(config or {})
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.maillog_path = self.root / "maillog"
        self._running = False

    # -- configuration ----------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The effective main.cf: the base settings with `self.config` over them."""
        base = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": str(self.maillog_path),
            # Without this prefix list Postfix refuses a maillog_file outside /var.
            "maillog_file_prefixes": f"/var,{self.root}",
            "virtual_mailbox_base": str(self.mail_dir),
            # Off the network: no DNS, peers only as IP literals, connections from loopback.
            "disable_dns_lookups": "yes",
            "smtp_bind_address": "127.0.0.1",
            "lmtp_bind_address": "127.0.0.1",
            "smtpd_peername_lookup": "no",
            # No local delivery: this instance relays or stores in virtual mailboxes only.
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "yes",
            # One SMTP session per delivery: a session cached for the next message would
            # outlive the test's peer, and tests want to see each connection.
            "smtp_connection_cache_on_demand": "no",
            "smtp_tls_loglevel": "1",
            # Tests wait for retries: seconds, not Postfix's production minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "delay_warning_time": "0h",
        }
        return base | self.config

    def configure(self, changes: Mapping[str, str | None], *, replace: bool = False) -> None:
        """Change main.cf settings (None removes one; `replace` drops every earlier change
        first); a running instance reloads."""
        if replace:
            self.config.clear()
        for name, value in changes.items():
            if value is None:
                self.config.pop(name, None)
            else:
                self.config[name] = value
        self._write_config()
        if self._running:
            self.reload()

    def reload(self, timeout: float = 10.0) -> None:
        """Make the running instance re-read main.cf, and wait until every daemon runs with
        the new configuration.

        This is what `postfix reload` does after its ~2 s of sanity checks: SIGHUP the
        master, which re-reads main.cf and tells its daemons to exit as soon as they are
        idle, then starts new ones. Waiting for the old ones to be gone matters: a trigger
        such as `flush()` that the old queue manager takes in its last moment is lost, and
        an old smtp client would still use the old relayhost and password. (The master's
        "reload" log line is no sign to wait for: postlogd is restarted at the same moment,
        and now and then that line is lost with it.)"""
        master = self.master_pid()
        deadline = time.monotonic() + timeout
        # The queue manager only exits when the master tells it to, so its going is the sign
        # that the master has re-read main.cf. After an earlier reload it may not have been
        # restarted yet: wake it (a harmless "scan the incoming queue").
        while "qmgr" not in (old := _children(master)).values():
            subprocess.run(
                [POSTKICK, "-c", str(self.config_dir), "public", "qmgr", "I"],
                capture_output=True,
                timeout=timeout,
            )
            self._wait(deadline, f"no queue manager running: {old}")
        os.kill(master, signal.SIGHUP)
        while left := old.keys() & _children(master).keys():
            self._wait(deadline, f"Postfix daemons {sorted(left)} still running after reload")
        # postlogd was restarted too, and log lines sent while it is down wait in a socket
        # that holds only ten: see a line of our own through, so the next burst is not lost.
        self.mark_log("reloaded", timeout=max(0.1, deadline - time.monotonic()))

    def mark_log(self, text: str, timeout: float = 10.0) -> int:
        """Write `text` (and a unique token) into the maillog with `postlog` and wait until it
        is there; returns the log position after it."""
        token = f"{text} {secrets.token_hex(4)}"
        deadline = time.monotonic() + timeout
        while True:
            since = self.log_position()
            subprocess.run(
                [POSTLOG, "-c", str(self.config_dir), "-t", "postbode-test", token],
                capture_output=True,
                timeout=timeout,
            )
            retry = time.monotonic() + 1.0
            while time.monotonic() < min(retry, deadline):
                text = self.maillog(since)
                end = text.find(token)
                if end != -1:
                    return since + len(text[: end + len(token)].encode())
                time.sleep(0.01)
            self._wait(deadline, f"{token!r} not logged within {timeout}s")

    @staticmethod
    def _wait(deadline: float, failure: str) -> None:
        if time.monotonic() > deadline:
            raise PostfixError(failure)
        time.sleep(0.01)

    def master_pid(self) -> int:
        """The process id of the instance's master daemon."""
        return int((self.queue_dir / "pid" / "master.pid").read_text().strip())

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for name, value in self.main_cf().items():
            if "\n" in value:
                raise ValueError(f"main.cf value of {name} spans lines")
            lines.append(f"{name} = {value}")
        files = {
            "main.cf": "\n".join(lines) + "\n",
            "master.cf": _MASTER_CF.format(listen=f"{self.host}:{self.port}"),
        }
        # Postfix will not read a table file younger than a second or two (it may be half
        # written) and polls every 0.3 s until it is older: date the files back so every
        # daemon and `sendmail` reads them at once.
        settled = time.time() - 60
        for name, text in files.items():
            path = self.config_dir / name
            path.write_text(text)
            os.utime(path, (settled, settled))

    def _prepare_directories(self) -> None:
        postfix_user = pwd.getpwnam("postfix")
        for ancestor in self.root.resolve().parents:
            if not ancestor.stat().st_mode & 0o001:
                raise PostfixError(
                    f"{ancestor} is not world-traversable (o+x), so the postfix user cannot "
                    f"reach {self.root}: pass root=None for a directory of the instance's own"
                )
        # mktemp-style 0700 directories would keep the `postfix` user out of data/ and mail/.
        for directory in (self.root, self.config_dir, self.queue_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, NOBODY_UID, NOBODY_UID)

    # -- running ----------------------------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60.0) -> str:
        """Run `postfix -c <dir> ARGS`. Postfix reports errors to syslog, and this machine
        may have none (no /dev/log): on failure, `postfix check` is rerun on a pseudo-terminal,
        where Postfix also writes to stderr, to put the real reason in the exception."""
        command = [POSTFIX, "-c", str(self.config_dir), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode == 0:
            return result.stdout
        detail = result.stdout + result.stderr
        if not detail.strip() and shutil.which("script"):
            check = shlex.join([POSTFIX, "-c", str(self.config_dir), "check"])
            shown = subprocess.run(
                ["script", "-qec", check, "/dev/null"],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            detail = shown.stdout + shown.stderr
        raise PostfixError(
            f"`{shlex.join(command)}` exited {result.returncode}:\n{detail}\n{self.maillog()}"
        )

    def start(self, timeout: float = 30.0) -> Self:
        """Write the configuration, start the master daemon, and wait until SMTP answers."""
        require_postfix()
        self._prepare_directories()
        self._write_config()
        self._postfix("start")  # creates the queue directories, then starts the master
        self._running = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PostfixError(f"Postfix not answering on {self.host}:{self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the instance (its queue stays on disk)."""
        try:
            if self._running:
                self._running = False
                self._postfix("stop")
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- submitting -------------------------------------------------------------------------

    def sendmail(self, sender: str, recipients: Iterable[str], message: bytes) -> None:
        """Submit through Postfix's `sendmail` (postdrop → pickup), as a local program would."""
        command = [SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--", *recipients]
        result = subprocess.run(command, input=message, capture_output=True, timeout=60)
        if result.returncode != 0:
            raise PostfixError(
                f"sendmail exited {result.returncode}: {result.stderr.decode(errors='replace')}"
            )

    # -- observing --------------------------------------------------------------------------

    def maillog(self, since: int = 0) -> str:
        """The instance's log, from byte offset `since` (see `log_position()`)."""
        with contextlib.suppress(FileNotFoundError), open(self.maillog_path, "rb") as log:
            log.seek(since)
            return log.read().decode("utf-8", "replace")
        return ""

    def log_position(self) -> int:
        """The log's current end: pass it to `maillog()` / `wait_for_log()` as `since`."""
        try:
            return self.maillog_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 20.0, *, since: int = 0
    ) -> re.Match[str]:
        """The first match of `pattern` in the log after `since`, waiting for it to appear."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.maillog(since))
            if found:
                return found
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"{regex.pattern!r} not logged within {timeout}s:\n{self.maillog(since)}"
                )
            time.sleep(0.05)

    def queue(self) -> list[dict[str, Any]]:
        """Every message in the instance's queues (`postqueue -j`: queue_name, queue_id,
        sender, recipients with delay_reason …)."""
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise PostfixError(f"postqueue -j exited {result.returncode}: {result.stderr}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        """Wait until every queued message has been delivered or bounced (and the queue
        files of pickup's maildrop too are gone)."""
        deadline = time.monotonic() + timeout
        while True:
            queued = self.queue()
            maildrop = list((self.queue_dir / "maildrop").glob("*"))
            if not queued and not maildrop:
                return
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"queue not empty after {timeout}s: {queued}\n{self.maillog()[-4000:]}"
                )
            time.sleep(0.05)

    def purge(self) -> None:
        """Delete every queued message (`postsuper -d ALL`): a clean slate between tests."""
        subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"], check=True, capture_output=True
        )

    def flush(self) -> None:
        """Retry every deferred message now (`postqueue -f`)."""
        subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-f"], check=True, capture_output=True
        )

    def mailbox(self, name: str = "inbox") -> list[bytes]:
        """The messages a receiving MX stored in the Maildir `name` (see receiving_mx_config)."""
        new = self.mail_dir / name / "new"
        return [p.read_bytes() for p in sorted(new.glob("*"))] if new.is_dir() else []


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`: process id → command name (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid …; comm may hold spaces and parentheses
            head, _, tail = stat.read_text().rpartition(")")
        except OSError:  # the process ended while we looked
            continue
        fields = tail.split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found[int(stat.parent.name)] = head.partition("(")[2]
    return found
