"""A minimal SMTP client for load generators: a few microseconds of CPU per message, so a
benchmark's figures are the server's."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl


class SmtpSession:
    """One SMTP session kept open for many messages, pipelining MAIL, RCPT and DATA as
    RFC 2920 allows (what Postfix does): two round trips per message. With `pipelining`
    False it waits for each reply before the next command, as Python's smtplib, PHPMailer
    and most application libraries do: four round trips per message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pipelining = True

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        tls: bool,
        *,
        source: str | None = None,
    ) -> SmtpSession:
        """A session, authenticated unless `username` is None (mail a receiving MX gets);
        `source`: the local address to connect from."""
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None
        )
        session = cls(reader, writer)
        await session.expect(b"220")
        await session.command(b"EHLO bench.test", b"250")
        if tls:
            await session.command(b"STARTTLS", b"220")
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # Postbode's certificate may be self-signed
            await writer.start_tls(context)
            await session.command(b"EHLO bench.test", b"250")
        if username is not None:
            login = base64.b64encode(f"\0{username}\0{password}".encode())
            await session.command(b"AUTH PLAIN " + login, b"235")
        return session

    async def reply(self) -> bytes:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def expect(self, code: bytes) -> bytes:
        answer = await self.reply()
        if not answer.startswith(code):
            raise RuntimeError(answer.decode(errors="replace").strip())
        return answer

    async def command(self, line: bytes, code: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.expect(code)

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        """One message; returns at its 250, raises RuntimeError at any other reply."""
        commands = (f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "DATA")
        if self.pipelining:
            self.writer.write("".join(c + "\r\n" for c in commands).encode())
            for code in (b"250", b"250", b"354"):
                await self.expect(code)
        else:
            for command, code in zip(commands, (b"250", b"250", b"354"), strict=True):
                await self.command(command.encode(), code)
        # RFC 5321 §4.5.2: a line starting with "." gets another one
        data = data.replace(b"\r\n.", b"\r\n..")
        if data.startswith(b"."):
            data = b"." + data
        if not data.endswith(b"\r\n"):  # the final "." must start a line of its own
            data += b"\r\n"
        self.writer.write(data + b".\r\n")
        await self.expect(b"250")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.command(b"QUIT", b"221")
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
