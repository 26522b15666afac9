"""A real Mosquitto broker for tests, on a free loopback port, and a 3.1.1-only proxy in front of it.

    broker = Mosquitto(tmp_path)       # writes mosquitto.conf; nothing runs yet
    broker.start()                     # OS-chosen port on 127.0.0.1, waits until it accepts connections
    broker.restart()                   # graceful stop (the database is saved), start on the same port
    broker.stop()
    Mosquitto(tmp_path, users={"box-1": "s3cret"}, tls=make_test_certs(tmp_path / "pki"))  # auth, TLS
    Mosquitto(tmp_path, options=("max_packet_size 100000",))   # more mosquitto.conf lines

Persistence lives in the work dir, so a restart keeps persistent sessions, their queued QoS 1
messages and retained messages, as a production broker with `persistence true` does.
`set_tcp_nodelay true` as in every broker config we ship (DESIGN.md: 40 ms stalls otherwise).

`Mqtt311OnlyProxy` plays a broker that speaks MQTT 3.1.1 only (amqtt 0.12 does this): it answers a
protocol-level-5 CONNECT with a 3.1.1 CONNACK "unacceptable protocol version" and closes, and
forwards every other connection to the real broker.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    for candidate in MOSQUITTO_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has just handed out on `host` (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"broker process exited before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout:.0f} s")


@dataclass(frozen=True)
class BrokerCerts:
    ca_file: Path
    cert_file: Path  # the broker's, for localhost and 127.0.0.1, signed by the CA
    key_file: Path


def make_test_certs(directory: Path) -> BrokerCerts:
    """A throwaway CA and a broker certificate signed by it (EC P-256, valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeglm test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key, ca_key,
                  [(san, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    certs = BrokerCerts(directory / "ca.pem", directory / "broker.pem", directory / "broker.key")
    certs.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return certs


def password_line(user: str, password: str, iterations: int = 101) -> str:
    """A mosquitto 2.0 password_file line (what `mosquitto_passwd -b` writes: PBKDF2-SHA512)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class Mosquitto:
    """One mosquitto process with a generated config; see the module docstring.

    `users`: name → password; anonymous clients are then refused. `tls`: the listener speaks TLS.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path, binary: str | None = None, *, users: dict[str, str] | None = None,
                 tls: BrokerCerts | None = None, options: tuple[str, ...] = ()):
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port: int | None = None
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.users = users
        self.tls = tls
        self.options = options  # more mosquitto.conf lines, e.g. "max_packet_size 100000"
        self._proc: subprocess.Popen | None = None

    def _write_conf(self) -> None:
        lines = [f"listener {self.port} {self.host}"]
        if self.tls is not None:  # listener options: they follow their listener line
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}", f"keyfile {self.tls.key_file}"]
        if self.users:
            passwords = self.workdir / "passwords"
            passwords.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            *self.options,
        ]
        if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot write the tmp dir
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "Mosquitto":
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        self._write_conf()
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        try:
            wait_for_port(self.host, self.port, START_TIMEOUT_S, alive=lambda: self._proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}: {exc}\n"
                               f"{self.log_text()}") from None
        return self

    def stop(self) -> None:
        """Graceful stop: SIGTERM makes mosquitto save sessions and retained messages."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr:
            text += self._proc.stderr.read().decode(errors="replace")
        return text


class Mqtt311OnlyProxy:
    """A TCP proxy that refuses MQTT 5 CONNECTs the way a 3.1.1-only broker does."""

    REFUSE_V5 = bytes([0x20, 0x02, 0x00, 0x01])  # CONNACK, 3.1.1 form: rc 1 = unacceptable protocol version

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self._server = socket.create_server((self.host, 0))
        self.port = self._server.getsockname()[1]
        self.refused_v5 = 0
        self.forwarded = 0
        self._closing = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="mqtt311-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = self._read_connect(client)
        if first is None:
            client.close()
            return
        if self._protocol_level(first) == 5:
            self.refused_v5 += 1
            client.sendall(self.REFUSE_V5)
            client.close()
            return
        upstream = socket.create_connection(self.upstream)
        self._socks += [client, upstream]
        self.forwarded += 1
        upstream.sendall(first)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _read_connect(sock: socket.socket) -> bytes | None:
        """Read the whole first packet (the CONNECT): fixed header, remaining length, body."""
        data = b""
        while True:
            if len(data) >= 2:
                length, mult, i = 0, 1, 1
                while i < len(data):
                    length += (data[i] & 0x7F) * mult
                    mult *= 128
                    if not data[i] & 0x80:
                        total = i + 1 + length
                        if len(data) >= total:
                            return data
                        break
                    i += 1
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk

    @staticmethod
    def _protocol_level(connect: bytes) -> int:
        i = 1
        while connect[i] & 0x80:  # skip the remaining-length bytes
            i += 1
        name_len = int.from_bytes(connect[i + 1:i + 3], "big")
        return connect[i + 3 + name_len]

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closing = True
        self._server.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


def retained(port: int, topic: str, wait_s: float = 1.0, expect: int = 0) -> list[bytes]:
    """Retained messages on `topic` (a fresh subscriber gets them right after its SUBACK): up to `expect` of them
    waited for (10 s; the network thread may be slow to run on a loaded box), then `wait_s` more for any others."""
    got: list[bytes] = []
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = lambda c, u, m: got.append(m.payload) if m.payload else None
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    assert subscribed.wait(10)
    deadline = time.monotonic() + 10
    while len(got) < expect and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(wait_s)
    client.loop_stop()
    client.disconnect()
    return got
