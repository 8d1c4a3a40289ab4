"""`nucleus fleet` against a real Mosquitto with TLS and passwords, as an operator runs it.

Every certificate mistake is one line naming the flag (``--ca``, ``--cert``, ``--key``,
``--broker``) and the file, in the words the device's link uses for its settings, at once rather
than after the connect timeout. Flags the connection would silently ignore are refused. The
password comes from a file or the environment, out of `ps` and the shell history, and is never
printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fleet_kit import COMPONENT, ArtifactServer, LightDaemon, daemon_settings, fleet_cli, recipe
from sync_testkit import Certs, Mosquitto

from cloud_sync import fleet
from cloud_sync.fleet import PASSWORD_ENV

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def running(broker: Mosquitto) -> Iterator[Mosquitto]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def one_error_line(proc: object) -> str:
    """The error `nucleus fleet` printed: exactly one line on stderr, nothing on stdout, exit 1."""
    stdout, stderr, code = (getattr(proc, k) for k in ("stdout", "stderr", "returncode"))
    assert (code, stdout) == (1, ""), (code, stdout, stderr)
    assert stderr.startswith("nucleus fleet: ") and stderr.count("\n") == 1, stderr
    return str(stderr)


Flags = Callable[[Certs, Path], list[str]]


def _flags(ca: str | None = "ca", cert: str | None = "client_cert", key: str | None = "client_key") -> Flags:
    def make(certs: Certs, tmp: Path) -> list[str]:
        out = []
        for flag, name in (("--ca", ca), ("--cert", cert), ("--key", key)):
            if name is not None:
                out += [flag, str(getattr(certs, name, None) or tmp / name)]
        return out
    return make


# case: (the broker's certificate, the operator's flags, what the error says; {name} is a file of Certs, {tmp} the
# test's directory). The broker runs TLS 1.3, where it refuses a client certificate after the handshake.
TLS_CASES: dict[str, tuple[str, Flags, str]] = {
    "wrong_ca": ("server_cert", _flags(ca="other_ca"),
                 "the broker's certificate is not signed by a CA in --ca {other_ca} (self-signed certificate"),
    "server_cert_for_another_host": ("server_other_host", _flags(),
                                     "the broker's certificate is not valid for 127.0.0.1, the host in --broker"),
    "client_cert_of_other_ca": ("server_cert", _flags(cert="client_other_ca"),
                                "the broker refused the client certificate --cert {client_other_ca} "
                                "(tlsv1 alert unknown ca)"),
    "no_client_cert": ("server_cert", _flags(cert=None, key=None),
                       "the broker requires a client certificate and none is configured: set --cert and --key"),
    "missing_ca_file": ("server_cert", _flags(ca="nope.crt"), "--ca {tmp}/nope.crt: No such file or directory"),
    "ca_file_not_pem": ("server_cert", _flags(ca="client_key"), "--ca {client_key}: no PEM CA certificate in it"),
    "key_of_another_certificate": ("server_cert", _flags(key="server_key"),
                                   "--key {server_key}: is not the key of the certificate in --cert {client_cert}"),
    "certificate_without_key": ("server_cert", _flags(key=None),
                                "--cert {client_cert}: no private key in it, and --key is not set"),
}


@pytest.mark.parametrize("case", sorted(TLS_CASES))
def test_tls_mistakes_are_one_line_naming_the_flag_and_the_file(tmp_path: Path, certs: Certs, case: str) -> None:
    """They read "[SSL: CERTIFICATE_VERIFY_FAILED] ...", "PEM lib", "[Errno 2] ..." without the file,
    or, for a client certificate the broker refuses, paho's raw "failed to receive on socket" and,
    after the whole 10 s timeout, "Operation timed out"."""
    server_cert, flags, words = TLS_CASES[case]
    with running(Mosquitto(tmp_path / "broker", certs=certs, server_cert=getattr(certs, server_cert),
                           tls_version="tlsv1.3")) as broker:
        proc = fleet_cli(tmp_path, "status", "--broker", broker.url, "--group", "turbines", *flags(certs, tmp_path))
    error = one_error_line(proc)
    expected = words.format(tmp=tmp_path, **{f: getattr(certs, f) for f in certs.__dataclass_fields__})
    assert expected in error, error


def test_a_tls_broker_that_closes_without_a_reason_is_tried_again_then_named(tmp_path: Path, certs: Certs) -> None:
    """A TLS 1.3 broker refuses a client certificate by an alert and a close that race: when the
    close wins, the client reads a bare EOF (the TLS walk saw test_tls_mistakes...[client_cert_of_
    other_ca] fail 1 run in 3 so). `nucleus fleet` tried once and said "cannot reach the broker".
    Here a TLS listener that always closes after reading the CONNECT makes that race certain: the
    tool tries again (the next attempt usually reads the alert), then says what it saw."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    accepted: list[int] = []

    def serve() -> None:
        for _ in range(fleet.TLS_EOF_ATTEMPTS + 2):  # bounded
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(10)
                conn.recv(1024)  # the CONNECT, read: the close is then a FIN, with no close_notify

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"mqtts://127.0.0.1:{listener.getsockname()[1]}"
        proc = fleet_cli(tmp_path, "status", "--broker", url, "--group", "turbines", *_flags()(certs, tmp_path))
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        listener.close()
        thread.join(timeout=30)
    error = one_error_line(proc)
    assert len(accepted) == fleet.TLS_EOF_ATTEMPTS, (accepted, error)
    assert "the broker ended the TLS connection without giving a reason" in error, error
    assert f"--cert {certs.client_cert}" in error, error


def test_a_socket_closed_before_the_loop_watches_it_leaves_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """What aiomqtt does when a connect fails at once (above: a refused client certificate), made
    certain: paho's thread asks the loop to watch a socket that is closed when the loop gets to it.
    asyncio printed "Exception in callback ... Bad file descriptor" and a traceback under the one
    error line (about one `nucleus fleet` run in 60 in the no_client_cert case)."""
    async def stale_watch() -> int:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        fd = sock.fileno()
        sock.close()
        await asyncio.to_thread(loop.call_soon_threadsafe, loop.add_writer, fd, lambda: None)
        await asyncio.sleep(0)
        return 0

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        assert fleet.run(stale_watch()) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR] == []


def test_the_right_tls_files_connect(tmp_path: Path, certs: Certs) -> None:
    with running(Mosquitto(tmp_path / "broker", certs=certs, tls_version="tlsv1.3")) as broker:
        proc = fleet_cli(tmp_path, "status", "--broker", broker.url, "--group", "turbines", *_flags()(certs, tmp_path))
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr  # 1: no device has reported
    assert proc.stdout.startswith("group turbines: no current deployment document")


PASSWORD = "correct horse"


def test_credentials_in_the_broker_url_are_refused_without_echoing_them(tmp_path: Path) -> None:
    """As the device refuses them in mqtt.url: paho never sends them (the connection went out
    without credentials and the broker's refusal did not say why)."""
    with running(Mosquitto(tmp_path / "broker", users={"op": PASSWORD})) as broker:
        url = broker.url.replace("mqtt://", f"mqtt://op:{quote(PASSWORD)}@")
        error = one_error_line(fleet_cli(tmp_path, "status", "--broker", url, "--group", "turbines"))
    assert error.startswith("nucleus fleet: --broker must not carry credentials (user:password@): give --username")
    assert "horse" not in error


# case: (flags that were ignored, what the error says); against a plain listener that wants a password, with
# the password in the environment
IGNORED: dict[str, tuple[Callable[[Mosquitto, Certs], list[str]], str]] = {
    "tls_files_with_a_plain_url": (lambda b, c: ["--broker", b.url, "--username", "op", "--ca", str(c.ca)],
                                   "--ca set but --broker mqtt://127.0.0.1:{port} is not TLS: use mqtts://"),
    "key_without_cert": (lambda b, c: ["--broker", b.url.replace("mqtt://", "mqtts://"), "--ca", str(c.ca),
                                       "--key", str(c.client_key)],
                         "--key is set without --cert: the client certificate goes in --cert"),
    "password_without_username": (lambda b, c: ["--broker", b.url],
                                  "password (NUCLEUS_FLEET_PASSWORD) is set without --username: MQTT sends a "
                                  "password only with a user name"),
}


@pytest.mark.parametrize("case", sorted(IGNORED))
def test_flags_the_connection_would_ignore_are_refused(tmp_path: Path, certs: Certs, case: str) -> None:
    """Each of these connected without what was given (a --ca on a plain URL sent the password in
    clear text) or failed for another reason than the one to fix."""
    flags, words = IGNORED[case]
    with running(Mosquitto(tmp_path / "broker", users={"op": PASSWORD})) as broker:
        error = one_error_line(fleet_cli(tmp_path, "status", *flags(broker, certs), "--group", "turbines",
                                         env={PASSWORD_ENV: PASSWORD}))
    assert error.endswith(words.format(port=broker.port) + "\n"), error
    assert "horse" not in error


def test_the_password_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """--password was the only way: visible to every user in `ps`, kept in the shell history. A file
    or NUCLEUS_FLEET_PASSWORD keep it out; a flag wins over the environment; --password still works,
    with a warning; a refused password says where it came from and is not printed."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "wrong").write_text("hunter2\n")
    with running(Mosquitto(tmp_path / "broker", users={"op": PASSWORD})) as broker:
        base = ["status", "--broker", broker.url, "--group", "turbines", "--username", "op"]
        accepted = {"file": fleet_cli(tmp_path, *base, "--password-file", "pw"),
                    "environment": fleet_cli(tmp_path, *base, env={PASSWORD_ENV: PASSWORD}),
                    "file over environment": fleet_cli(tmp_path, *base, "--password-file", "pw",
                                                       env={PASSWORD_ENV: "hunter2"})}
        on_argv = fleet_cli(tmp_path, *base, "--password", PASSWORD)
        refused = one_error_line(fleet_cli(tmp_path, *base, "--password-file", "wrong", env={PASSWORD_ENV: PASSWORD}))
    for how, proc in accepted.items():  # connected: exit 1 only because no device has reported
        assert (proc.returncode, proc.stderr) == (1, ""), (how, proc.stderr)
        assert proc.stdout.startswith("group turbines: no current deployment document"), how
    assert on_argv.stdout.startswith("group turbines: no current deployment document"), on_argv.stderr
    assert on_argv.stderr == ("nucleus fleet: warning: --password is visible to other users in `ps` and stays in "
                              "the shell history: use --password-file FILE or NUCLEUS_FLEET_PASSWORD\n")
    assert "the broker refused --username 'op' and its password (--password-file): " in refused, refused
    assert "hunter2" not in refused


@pytest.mark.parametrize(("content", "flags", "words"), [
    (None, [], "--password-file pw: No such file or directory"),
    ("\n", [], "--password-file pw: empty"),
    ("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", [],
     "--password-file pw: more than one line (the file holds the password alone)"),
    (PASSWORD, ["--password", PASSWORD], "give the password once: --password-file or --password, not both"),
])
def test_a_password_file_that_cannot_serve_is_one_line(tmp_path: Path, content: str | None, flags: list[str],
                                                       words: str) -> None:
    if content is not None:
        (tmp_path / "pw").write_text(content)
    proc = fleet_cli(tmp_path, "status", "--broker", "mqtt://127.0.0.1:1", "--group", "turbines", "--username", "op",
                     "--password-file", "pw", *flags)
    assert one_error_line(proc) == f"nucleus fleet: {words}\n"


# how the operator gives the password: (flags, environment, the note under the status line)
PASSWORD_WAYS: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
    "file": (["--password-file", "pw"], {}, []),
    "environment": ([], {PASSWORD_ENV: PASSWORD}, ["    with NUCLEUS_FLEET_PASSWORD set, as for this deploy"]),
    "command line": (["--password", PASSWORD], {},
                     ["    with the password in NUCLEUS_FLEET_PASSWORD or --password-file FILE (it is not printed)"]),
}


@pytest.mark.timeout(120)
def test_the_status_line_printed_by_deploy_follows_it_on_the_same_broker(tmp_path: Path, certs: Certs) -> None:
    """`deploy` prints the `status` command to follow it. It had --broker and the target only:
    copied, it failed against a broker with TLS or a password. It has the connection flags as they
    were given (quoted for the shell), never the password; a note says how to give one that was not
    in a file. Followed here as printed, against mutual TLS and a password, until a real device has
    applied each deployment."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    for name, copy in (("ca", "ca.pem"), ("client_cert", "op cert.pem"), ("client_key", "op.key")):
        shutil.copy(getattr(certs, name), tmp_path / copy)  # given relative to the working directory, one with a space
    users = {"op": PASSWORD, "dev-1": "device pw"}
    with ArtifactServer(tmp_path / "artifacts") as server, \
            running(Mosquitto(tmp_path / "broker", certs=certs, users=users)) as broker:
        settings = daemon_settings("dev-1", broker.url, ["turbines"])
        settings["mqtt"].update(ca_file=str(certs.ca), cert_file=str(certs.client_cert),
                                key_file=str(certs.client_key), username="dev-1", password="device pw")
        device = LightDaemon(tmp_path / "dev", settings)
        device.start()
        try:
            for version, way in zip(("1.0.0", "1.0.1", "1.0.2"), sorted(PASSWORD_WAYS), strict=True):
                flags, env, note = PASSWORD_WAYS[way]
                rec = recipe(version, digest=server.add(COMPONENT, version, "hello.txt", b"hello\n"))
                (tmp_path / rec.source).write_text(rec.text)
                deployed = fleet_cli(tmp_path, "deploy", rec.source, "--broker", broker.url, "--group", "turbines",
                                     "--artifacts-url", server.url, "--ca", "ca.pem", "--cert", "op cert.pem",
                                     "--key", "op.key", "--username", "op", *flags, env=env)
                assert deployed.returncode == 0, (way, deployed.stderr)
                assert PASSWORD not in deployed.stdout + deployed.stderr
                deployment_id = deployed.stdout.split()[1].rstrip(":")
                status_line, *rest = deployed.stdout.split("  follow it with: ", 1)[1].splitlines()
                words = shlex.split(status_line)
                assert words[:3] == ["nucleus", "fleet", "status"], status_line
                followed = fleet_cli(tmp_path, *words[2:], env={PASSWORD_ENV: PASSWORD} if note else {})
                assert (followed.returncode, followed.stderr) == (0, ""), (way, followed.stdout, followed.stderr)
                head, _, row, *_ = followed.stdout.splitlines()
                assert head.startswith(f"group turbines: deployment {deployment_id} "), followed.stdout
                assert row.split()[:3] == ["dev-1", "SUCCEEDED", deployment_id], followed.stdout
                assert rest == note, way
        finally:
            device.stop()
