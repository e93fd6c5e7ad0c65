"""A raw ZMTP 3.0 peer and a private live kernel, for tests that must send what no ZeroMQ library
sends: frame headers declaring absurd lengths, reserved flag bits, endless multipart messages,
replayed signatures.

ZMTP 3.0 (https://rfc.zeromq.org/spec/23/): a 64-byte greeting each way, then the NULL mechanism's
READY command each way, then frames of `flags, length (1 or 8 bytes, big-endian), body`. Only the
client side is written here, with the NULL mechanism (the kernel's only one).

`LiveKernel` starts `pivot-kernel kernel` on a connection file of its own, with its engine
disabled (PIVOT_PYTHON=/bin/false: the engine fails to start at once, so execute requests are
answered with an error and no Rust is compiled). Everything these tests exercise, the sockets,
the wire decoder and the requests answered without the engine, runs exactly as in a real kernel.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
assert len(GREETING) == 64

FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04
DELIMITER = b"<IDS|MSG>"


def frame_header(length: int, more: bool = False, command: bool = False, long: bool | None = None) -> bytes:
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    if long is None:
        long = length > 255
    if long:
        return bytes([flags | FLAG_LONG]) + struct.pack(">Q", length)
    return bytes([flags, length])


def frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    return frame_header(len(body), more, command) + body


def multipart(frames: list[bytes]) -> bytes:
    return b"".join(frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames))


def ready_command(socket_type: bytes) -> bytes:
    name = b"READY"
    prop = bytes([len(b"Socket-Type")]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return frame(bytes([len(name)]) + name + prop, command=True)


class ConnectionClosed(Exception):
    pass


class Peer:
    """One ZMTP connection to a kernel port, handshake done."""

    def __init__(self, port: int, socket_type: bytes = b"DEALER", host: str = "127.0.0.1", timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(GREETING)
        greeting = self.recv_exact(64)
        assert greeting[0] == 0xFF and greeting[10] == 3, greeting
        self.sock.sendall(ready_command(socket_type))
        flags, _ = self.read_frame()
        assert flags & FLAG_COMMAND, "expected the kernel's READY"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sock.sendall(multipart(frames))

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionClosed(f"peer closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_frame(self) -> tuple[int, bytes]:
        flags = self.recv_exact(1)[0]
        if flags & FLAG_LONG:
            (length,) = struct.unpack(">Q", self.recv_exact(8))
        else:
            length = self.recv_exact(1)[0]
        return flags, self.recv_exact(length)

    def recv_multipart(self, timeout: float | None = None) -> list[bytes]:
        """The next message (commands such as PING are skipped); socket.timeout when none comes."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            frames = []
            while True:
                flags, body = self.read_frame()
                if flags & FLAG_COMMAND:
                    continue
                frames.append(body)
                if not flags & FLAG_MORE:
                    return frames
        finally:
            self.sock.settimeout(old)

    def closed_by_kernel(self, timeout: float = 5) -> bool:
        """True when the kernel closes this connection within `timeout` (reading what it sends)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True
        return False


class Signer:
    def __init__(self, key: bytes):
        self.key = key

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        return hmac.new(self.key, b"".join(parts), hashlib.sha256).hexdigest().encode()


def header(msg_type: str, session: str) -> dict:
    return {
        "msg_id": uuid.uuid4().hex,
        "session": session,
        "username": "test",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "msg_type": msg_type,
        "version": "5.3",
    }


def request(signer: Signer, msg_type: str, content: dict, session: str = "fuzz") -> tuple[str, list[bytes]]:
    """(msg_id, frames from the delimiter on) of a signed request."""
    h = header(msg_type, session)
    parts = [json.dumps(x).encode() for x in (h, {}, {}, content)]
    return h["msg_id"], [DELIMITER, signer.sign(parts), *parts]


def parse_reply(frames: list[bytes]) -> dict:
    i = frames.index(DELIMITER)
    h, parent, _meta, content = (json.loads(f) for f in frames[i + 2 : i + 6])
    return {"header": h, "parent_header": parent, "content": content, "msg_type": h["msg_type"]}


def await_reply(peer: Peer, msg_id: str, timeout: float) -> dict | None:
    """The reply whose parent is `msg_id`, skipping others; None when none comes in `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = parse_reply(peer.recv_multipart(timeout=left))
        except (socket.timeout, TimeoutError):
            return None
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class LiveKernel:
    """`pivot-kernel kernel` on a private connection file; stderr goes to a file in `workdir`."""

    def __init__(self, binary: Path, workdir: Path, key: str = "fuzz-key", ip: str = "127.0.0.1"):
        workdir.mkdir(parents=True, exist_ok=True)
        shell, iopub, stdin, control, hb = free_ports(5)
        self.ports = {"shell": shell, "iopub": iopub, "stdin": stdin, "control": control, "hb": hb}
        self.key = key.encode()
        self.signer = Signer(self.key)
        conn = {
            "transport": "tcp", "ip": ip, "key": key, "signature_scheme": "hmac-sha256",
            "shell_port": shell, "iopub_port": iopub, "stdin_port": stdin, "control_port": control, "hb_port": hb,
        }
        self.connection_file = workdir / "kernel.json"
        self.connection_file.write_text(json.dumps(conn))
        self.stderr_path = workdir / "kernel.stderr"
        env = {k: v for k, v in os.environ.items() if k not in ("LIBTORCH",)}
        env.update(PIVOT_PYTHON="/bin/false", PIVOT_CACHE_DIR=str(workdir / "cache"), PIVOT_NO_PRELUDE="1")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [str(binary), "kernel", "--connection-file", str(self.connection_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if self.heartbeat(timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"kernel not answering its heartbeat after {timeout} s: {self.stderr()}")

    def heartbeat(self, timeout: float = 5) -> bool:
        """One echo through the heartbeat port (a fresh REQ connection)."""
        with Peer(self.ports["hb"], b"REQ", timeout=timeout) as p:
            ping = uuid.uuid4().bytes
            p.send_multipart([b"", ping])
            return p.recv_multipart(timeout=timeout) == [b"", ping]

    def ask(self, peer: Peer, msg_type: str, content: dict, timeout: float = 10) -> dict | None:
        msg_id, frames = request(self.signer, msg_type, content)
        peer.send_multipart(frames)
        return await_reply(peer, msg_id, timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LiveKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
