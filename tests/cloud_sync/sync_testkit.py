"""Real parts for cloud_sync tests: a Mosquitto broker, certificates, a link cutter, a cloud-side collector."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from cloud_sync import envelope
from ipc.core import Principal
from ipc.errors import Unauthenticated

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/bin/mosquitto_passwd" if Path("/usr/bin/mosquitto_passwd").exists() else None)


def require_mosquitto() -> str:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; scripts/test installs it)")
    return MOSQUITTO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the broker trusts
    # the same keys, certified otherwise (for the failures a fleet meets: expiry, a wrong host, a foreign CA)
    server_expired: Path
    server_other_host: Path  # for broker.example.com only
    client_expired: Path
    client_other_ca: Path  # the client key, signed by other_ca


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate (EC keys: fast)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=test {ca} CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "other-host.ext").write_text("subjectAltName=DNS:broker.example.com\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    # -days -1: valid until yesterday, i.e. expired
    for out, csr, ca, days, ext in (("server", "server", "ca", "2", "server.ext"),
                                    ("server-expired", "server", "ca", "-1", "server.ext"),
                                    ("server-other-host", "server", "ca", "2", "other-host.ext"),
                                    ("client", "client", "ca", "2", None),
                                    ("client-expired", "client", "ca", "-1", None),
                                    ("client-other-ca", "client", "other", "2", None)):
        _openssl("x509", "-req", "-in", f"{csr}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-out", f"{out}.crt", "-days", days, *(["-extfile", ext] if ext else []), cwd=d)
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
                 d / "other.crt", d / "server-expired.crt", d / "server-other-host.crt", d / "client-expired.crt",
                 d / "client-other-ca.crt")


class Mosquitto:
    """A real broker on 127.0.0.1 with a generated config; stop()/start() keep the port."""

    def __init__(self, workdir: Path, *, certs: Certs | None = None, server_cert: Path | None = None,
                 tls_version: str = "tlsv1.2", users: dict[str, str] | None = None) -> None:
        self.binary = require_mosquitto()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = certs is not None
        lines = [f"listener {self.port} 127.0.0.1", "set_tcp_nodelay true", "user root",
                 "persistence true", f"persistence_location {self.dir}/", "autosave_interval 1",
                 "max_queued_messages 0", "max_inflight_messages 0", "log_dest stderr",
                 "log_type error", "log_type warning"]
        if users:
            if MOSQUITTO_PASSWD is None:
                pytest.skip("mosquitto_passwd is not installed")
            pw = self.dir / "passwd"
            pw.touch()
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True,
                               timeout=30)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if certs is not None:
            lines += [f"cafile {certs.ca}", f"certfile {server_cert or certs.server_cert}",
                      f"keyfile {certs.server_key}", "require_certificate true", f"tls_version {tls_version}"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file (queued QoS 1 for offline sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class LinkCutter:
    """A TCP relay between the device and the broker whose link the test can cut and restore.

    ``cut()`` closes every relayed connection and stops listening (connects are refused);
    ``restore()`` listens again on the same port. The cloud side stays connected to the broker.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        for t in (asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)


@dataclass
class Collector:
    """The cloud side: a persistent-session subscriber that records every delivered message id in order."""

    port: int
    topic_filter: str = "#"
    ids: list[str] = field(default_factory=list)
    by_topic: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    payloads: dict[str, Any] = field(default_factory=dict)
    raw: list[tuple[str, bytes, bool]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="cloud-collector",
                                          clean_session=False, **self.client_kwargs) as c:
                    await c.subscribe(self.topic_filter, qos=1)
                    self._ready.set()
                    async for m in c.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        self.raw.append((m.topic.value, payload, bool(m.retain)))
                        if m.topic.value.endswith("/status"):
                            continue
                        try:
                            _, delivered = envelope.parse(payload)
                        except ValueError:
                            continue
                        for d in delivered:
                            assert d.id is not None
                            self.ids.append(d.id)
                            self.by_topic[m.topic.value].append(d.id)
                            self.payloads[d.id] = d.payload
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def wait_ids(self, expected: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not expected <= set(self.ids):
            if time.monotonic() > deadline:
                missing = expected - set(self.ids)
                raise AssertionError(f"{len(missing)} of {len(expected)} messages never arrived, e.g. "
                                     f"{sorted(missing)[:5]}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def seq_of(message_id: str) -> int:
    return int(message_id.rsplit(":", 1)[1])


def assert_ordered_first_arrivals(by_topic: dict[str, list[str]]) -> None:
    """Per topic, the first arrival of each id comes in spool order (retransmissions may repeat a tail)."""
    for topic, ids in by_topic.items():
        seen: set[str] = set()
        firsts = []
        for i in ids:
            if i not in seen:
                seen.add(i)
                firsts.append(seq_of(i))
        assert firsts == sorted(firsts), f"topic {topic}: first arrivals out of order"


class TokenAuth:
    def __init__(self) -> None:
        self.tokens: dict[str, Principal] = {}

    def add(self, token: str, name: str) -> None:
        self.tokens[token] = Principal(name, "component")

    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        try:
            return self.tokens[token]
        except KeyError:
            raise Unauthenticated("unknown token") from None


class Policy:
    """(principal, service, operation, resource-pattern) grants; '*' matches anything."""

    def __init__(self) -> None:
        self.grants: set[tuple[str, str, str, str]] = set()

    def allow(self, principal: str, service: str, operation: str, resource: str) -> None:
        self.grants.add((principal, service, operation, resource))

    def is_authorized(self, principal: Principal, service: str, operation: str, resource: str) -> bool:
        return any(p == principal.name and s == service and o in (operation, "*") and r in (resource, "*")
                   for p, s, o, r in self.grants)
