"""Real bounces from real MTAs: a scripted receiving server refuses with published replies.

Each MTA (Postfix, Exim, OpenSMTPD) relays every test message to an aiosmtpd sink that
answers with one real-world refusal from `replies.toml` (at connect, MAIL, RCPT or end of
data); the MTA then writes its own bounce (DSN) and sends it to the envelope sender, which the
same sink takes in. A 4xx refusal is repeated until the MTA gives up (every MTA is set to keep
mail for seconds, not days). The bounces are written as a labelled corpus in the layout of
shared/bounce-corpus (eml/ + labels.jsonl), so its score.py scores them; the expected
category of each is known by construction.

Exim and OpenSMTPD are run from their Debian packages extracted into a scratch directory
(`apt-get download` + `dpkg-deb -x`: as apt packages both conflict with Postfix). OpenSMTPD's
queue and chroot paths are compiled in, so it runs in a private mount namespace with scratch
directories mounted over them.

    python tests/functional/bounces/mta_bounces.py OUT_DIR [--mta postfix --mta exim ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from postbode.testing.postfix import Postfix, inline_map, require_postfix
from postbode.testing.process import free_port
from postbode.testing.sink import Rule, Script, SmtpSink

HERE = Path(__file__).resolve().parent
REPLIES = HERE / "replies.toml"
# .ci/run downloads the packages here (tests reach nothing but loopback).
DEB_CACHE = Path(os.environ.get("POSTBODE_TEST_DEBS", "/var/cache/postbode-test-debs"))
EXIM_PACKAGES = ("exim4-daemon-light", "exim4-base", "exim4-config")
OPENSMTPD_PACKAGES = ("opensmtpd",)
SENDER_DOMAIN = "shop.test"
RCPT_DOMAIN = "dest.test"


@dataclass(frozen=True)
class Refusal:
    """One published reply and what a bounce carrying it means."""

    name: str
    stage: str
    reply: str
    category: str
    hard: bool
    source: str

    def text(self, rcpt: str, sender: str) -> str:
        return self.reply.format(rcpt=rcpt, sender=sender, ip="127.0.0.1")

    @property
    def status(self) -> str | None:
        """The enhanced status code the reply carries, if any (RFC 3463)."""
        first = self.reply.split("\n", 1)[0][4:].split(" ", 1)[0]
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "45":
            return first
        return None


def load_refusals(path: Path = REPLIES) -> list[Refusal]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return [
        Refusal(r["name"], r["stage"], r["reply"], r["category"], bool(r["hard"]), r["source"])
        for r in data["reply"]
    ]


def published_texts(path: Path = REPLIES) -> list[str]:
    """The reply and notice texts alone (published evidence for the leave-one-family-out
    evaluation)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    notices = [n["text"] for n in data.get("notice", [])]
    return [r.text("user@dest.test", "sender@shop.test") for r in load_refusals(path)] + notices


# -------------------------------------------------------------------------------- the MTAs
class Mta(Protocol):
    name: str
    port: int
    # Whether the MTA's bounce for mail it gave up on quotes the remote server's last
    # (4xx) reply; if not, "expired" is all such a bounce can tell.
    quotes_last_reply: bool
    stages: frozenset[str]  # the refusal stages it turns into bounces

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kick(self) -> None: ...


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def fetch_packages(names: Sequence[str], root: Path) -> Path:
    """Extract the Debian packages `.ci/run` downloaded into DEB_CACHE under root."""
    for name in names:
        debs = sorted(DEB_CACHE.glob(f"{name}_*.deb"))
        if not debs:
            raise RuntimeError(
                f"{name} not in {DEB_CACHE}: `mkdir -p {DEB_CACHE} && cd {DEB_CACHE} && "
                f"apt-get download {' '.join(EXIM_PACKAGES + OPENSMTPD_PACKAGES)}` "
                "(.ci/run does this)"
            )
        done = _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
        if done.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {debs[-1]}: {done.stderr}")
    return root


def _system_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created (as the package's maintainer script would) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        _run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ]
        )
        return pwd.getpwnam(name)


def _scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # the MTAs' unprivileged users must reach their files
    return path


class PostfixMta:
    """A private Postfix instance that relays by a transport map and gives up at once."""

    name = "postfix"
    quotes_last_reply = True
    stages = frozenset({"connect", "mail", "rcpt", "data"})

    def __init__(self, routes: dict[str, int]) -> None:
        transport = {d: f"smtp:[127.0.0.1]:{p}" for d, p in routes.items()}
        self.instance = Postfix(
            config={
                "transport_maps": inline_map(transport),
                "smtp_tls_security_level": "none",
                # postconf(5): 0 means "try only once"; a 4xx then bounces at once.
                "maximal_queue_lifetime": "0",
                "bounce_queue_lifetime": "0",
                "smtpd_relay_restrictions": "permit_mynetworks, reject",
                "smtp_skip_5xx_greeting": "no",
            },
            hostname="postfix.sender.test",
        )
        self.port = self.instance.port

    def start(self) -> None:
        require_postfix()
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def kick(self) -> None:
        self.instance.flush()


_EXIM_CONF = """\
exim_path = {root}/usr/sbin/exim4
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
exim_user = Debian-exim
exim_group = Debian-exim
never_users =
trusted_users = root
primary_hostname = exim.sender.test
qualify_domain = exim.sender.test
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
keep_environment =
tls_advertise_hosts =
acl_smtp_rcpt = acl_rcpt
delay_warning = 0s

begin acl
acl_rcpt:
  accept hosts = 127.0.0.1
  deny

begin routers
to_sink:
  driver = manualroute
  route_list = * 127.0.0.1 byname
  self = send
  transport = remote_smtp

begin transports
remote_smtp:
  driver = smtp
  port = ${{lookup{{$domain}}lsearch{{{d}/ports}}{{$value}}{{25}}}}
  allow_localhost
  hosts_avoid_tls = *

begin retry
# Give up on a temporary failure after a few seconds (the spec's retry rules, ch. 32).
*  *  F,3s,1s
"""


class EximMta:
    """Exim from Debian's packages, run from a scratch directory."""

    name = "exim"
    quotes_last_reply = True
    stages = frozenset({"connect", "mail", "rcpt", "data"})

    def __init__(self, routes: dict[str, int]) -> None:
        self.routes = routes
        self.port = free_port("127.0.0.1")
        self.dir = _scratch("postbode-exim-")
        self.root = self.dir / "root"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fetch_packages(EXIM_PACKAGES, self.root)
        # The binary's compiled-in user (Debian's packaging creates it).
        exim = _system_user("Debian-exim")
        for sub in ("spool", "log"):
            (self.dir / sub).mkdir()
            os.chown(self.dir / sub, exim.pw_uid, exim.pw_gid)
        (self.dir / "ports").write_text("".join(f"{d}: {p}\n" for d, p in self.routes.items()))
        conf = self.dir / "exim.conf"
        conf.write_text(_EXIM_CONF.format(root=self.root, d=self.dir, port=self.port))
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [str(self.root / "usr/sbin/exim4"), "-C", str(conf), "-bdf", "-q1s"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        _wait_for_smtp(self.port, self.proc, self.dir / "stderr")

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kick(self) -> None:
        pass  # the daemon runs the queue every second (-q1s)


_OPENSMTPD_CONF = """\
queue ttl 3s
listen on 127.0.0.1 port {port}
{actions}
"""


class OpenSmtpdMta:
    """OpenSMTPD from Debian's package, in a private mount namespace (its spool, chroot and
    control socket paths are compiled in) with scratch directories over those paths."""

    name = "opensmtpd"
    # smtpd's bounce for an expired envelope says "Envelope expired" and nothing of the
    # last reply; a 5xx greeting keeps the mail queued (the host counts as unavailable).
    quotes_last_reply = False
    stages = frozenset({"mail", "rcpt", "data"})

    def __init__(self, routes: dict[str, int]) -> None:
        self.routes = routes
        self.port = free_port("127.0.0.1")
        self.dir = _scratch("postbode-opensmtpd-")
        self.root = self.dir / "root"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fetch_packages(OPENSMTPD_PACKAGES, self.root)
        for user in (
            "opensmtpd",
            "opensmtpq",
        ):  # privilege separation (Debian's postinst makes them)
            _system_user(user)
        actions = []
        for i, (domain, port) in enumerate(sorted(self.routes.items())):
            actions.append(f'action "a{i}" relay host smtp://127.0.0.1:{port}')
            actions.append(f'match from any for domain "{domain}" action "a{i}"')
        conf = self.dir / "smtpd.conf"
        conf.write_text(_OPENSMTPD_CONF.format(port=self.port, actions="\n".join(actions)))
        conf.chmod(0o644)
        script = (
            "set -e; mount -t tmpfs tmpfs /var/spool; mkdir -m 711 /var/spool/smtpd; "
            "mount -t tmpfs tmpfs /run; mkdir -p /var/lib; mount -t tmpfs tmpfs /var/lib; "
            "mkdir -p /var/lib/opensmtpd/empty; "
            f"exec {self.root}/usr/sbin/smtpd -d -f {conf}"
        )
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        _wait_for_smtp(self.port, self.proc, self.dir / "stderr")

    def kick(self) -> None:
        # Retry every queued envelope now: OpenSMTPD's own schedule waits minutes.
        if self.proc is None:
            return
        # `unshare` and `sh -c` exec'd smtpd: its parent process has the namespace's pid.
        smtpd = self.proc.pid
        if smtpd:
            _run(
                [
                    "nsenter",
                    "-t",
                    str(smtpd),
                    "-m",
                    str(self.root / "usr/sbin/smtpctl"),
                    "schedule",
                    "all",
                ]
            )

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


MTAS = {"postfix": PostfixMta, "exim": EximMta, "opensmtpd": OpenSmtpdMta}


def _wait_for_smtp(
    port: int, proc: subprocess.Popen[bytes], stderr: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = stderr.read_text(errors="replace")
            raise RuntimeError(f"MTA exited {proc.returncode}: {err[-3000:]}")
        with contextlib.suppress(OSError), smtplib.SMTP("127.0.0.1", port, timeout=2) as s:
            s.noop()
            return
        time.sleep(0.05)
    raise RuntimeError(f"MTA not answering on 127.0.0.1:{port}")


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -------------------------------------------------------------------------------- generating
@dataclass
class Case:
    """One message: its sender, and the refusal each of its recipients gets."""

    name: str
    sender: str
    recipients: dict[str, Refusal] = field(default_factory=dict)


def plan(refusals: Sequence[Refusal]) -> list[Case]:
    """One message per refusal, plus one message to three recipients refused in three ways
    (a multi-recipient report: each recipient must keep its own reason)."""
    cases = []
    for r in refusals:
        domain = f"greet-{r.name}.test" if r.stage == "connect" else RCPT_DOMAIN
        cases.append(Case(r.name, f"s-{r.name}@{SENDER_DOMAIN}", {f"{r.name}@{domain}": r}))
    by_name = {r.name: r for r in refusals}
    trio = ("gmail-no-such-user", "gmail-over-quota", "postfix-relay-denied")
    if all(n in by_name for n in trio):
        cases.append(
            Case(
                "multi",
                f"s-multi@{SENDER_DOMAIN}",
                {f"multi-{n}@{RCPT_DOMAIN}": by_name[n] for n in trio},
            )
        )
    return cases


def _rules(cases: Sequence[Case]) -> list[Rule]:
    rules = []
    for case in cases:
        for rcpt, r in case.recipients.items():
            text = r.text(rcpt, case.sender)
            if r.stage == "rcpt":
                rules.append(Rule.rcpt(rcpt, text))
            elif r.stage == "data":
                rules.append(Rule.data(text, match=rcpt))
            elif r.stage == "mail":
                rules.append(Rule.mail(text, match=case.sender))
    return rules


def generate(
    mta_name: str, out: Path, refusals: Sequence[Refusal], timeout: float = 90.0
) -> list[dict[str, object]]:
    """Make `mta_name` bounce every planned case; write eml/<mta>/<case>.eml under `out`
    and return the label records (score.py's labels.jsonl format)."""
    mta_class = MTAS[mta_name]
    cases = plan([r for r in refusals if r.stage in mta_class.stages])
    with contextlib.ExitStack() as stack:
        main = stack.enter_context(SmtpSink(script=Script(*_rules(cases))))
        routes = {RCPT_DOMAIN: main.port, SENDER_DOMAIN: main.port}
        for case in cases:
            for rcpt, r in case.recipients.items():
                if r.stage == "connect":
                    greet = stack.enter_context(
                        SmtpSink(script=Script(Rule.connect(r.text(rcpt, case.sender))))
                    )
                    routes[rcpt.partition("@")[2]] = greet.port
        mta = mta_class(routes)
        mta.start()
        stack.callback(mta.stop)
        for case in cases:
            msg = EmailMessage()
            msg["From"] = case.sender
            msg["To"] = ", ".join(case.recipients)
            msg["Subject"] = f"Order confirmation ({case.name})"
            msg["Message-ID"] = f"<{case.name}.{mta_name}@{SENDER_DOMAIN}>"
            msg.set_content("Thank you for your order.\n")
            with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
                client.send_message(msg, from_addr=case.sender, to_addrs=list(case.recipients))
        bounces = _wait_for_bounces(main, mta, {c.sender for c in cases}, timeout)
    labels = []
    folder = out / "eml" / mta_name
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        raw = bounces.get(case.sender)
        if raw is None:
            continue  # the test reports missing bounces
        path = folder / f"{case.name}.eml"
        path.write_bytes(raw)
        labels.append(
            _label(f"{mta_name}/{case.name}.eml", mta_name, case, mta_class.quotes_last_reply)
        )
    return labels


def _wait_for_bounces(
    sink: SmtpSink, mta: Mta, senders: set[str], timeout: float
) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout
    next_kick = time.monotonic() + 6
    while time.monotonic() < deadline:
        for m in sink.messages:
            if m.mail_from in ("<>", "") and m.rcpt_tos and m.rcpt_tos[0] in senders:
                # the first bounce for a sender (a later one would be a second notice)
                found.setdefault(m.rcpt_tos[0], m.data)
        if senders <= found.keys():
            break
        if time.monotonic() > next_kick:
            mta.kick()
            next_kick = time.monotonic() + 3
        time.sleep(0.2)
    return found


def _expected(r: Refusal, quotes_last_reply: bool) -> tuple[str, bool, str | None]:
    """Category, hard, status a bounce of this refusal must be classified as."""
    if r.reply.startswith("4") and not quotes_last_reply:
        return "expired", False, None
    return r.category, r.hard, r.status


def _label(file: str, family: str, case: Case, quotes_last_reply: bool) -> dict[str, object]:
    records = []
    for rcpt, r in case.recipients.items():
        category, hard, status = _expected(r, quotes_last_reply)
        records.append(
            {
                "recipient": rcpt,
                "recipient_alternatives": [],
                "status": status,
                "status_is_sisimai_pseudo": False,
                "replycode": int(r.reply[:3]),
                "reason": category,
                "category": category,
                "hard_bounce": hard,
                "feedback_type": None,
                "reply": r.name,
            }
        )
    first = records[0]
    return {
        "file": file,
        "family": family,
        "group": file,
        "variant": "lf",
        "aliases": [],
        "same_message_as": [],
        "kind": "bounce",
        "is_bounce": True,
        "recipient": first["recipient"],
        "recipients": [r["recipient"] for r in records],
        "status": first["status"],
        "replycode": first["replycode"],
        "reason": first["reason"],
        "category": first["category"],
        "hard_bounce": first["hard_bounce"],
        "permanent": str(first["status"] or "")[:1] == "5",
        "records": records,
        "label_source": "generated: "
        + ", ".join(sorted({r.source for r in case.recipients.values()})),
    }


def write_corpus(
    out: Path, mtas: Sequence[str], refusals: Sequence[Refusal] | None = None
) -> dict[str, int]:
    """Generate bounces with every MTA in `mtas` into `out` (eml/ + labels.jsonl)."""
    refusals = list(refusals or load_refusals())
    out.mkdir(parents=True, exist_ok=True)
    labels: list[dict[str, object]] = []
    counts = {}
    for name in mtas:
        got = generate(name, out, refusals)
        counts[name] = len(got)
        labels += got
    with (out / "labels.jsonl").open("w") as fh:
        for label in labels:
            fh.write(json.dumps(label) + "\n")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mta", action="append", choices=sorted(MTAS), help="default: all")
    args = ap.parse_args()
    print(write_corpus(args.out, args.mta or sorted(MTAS)))


if __name__ == "__main__":
    sys.exit(main())
