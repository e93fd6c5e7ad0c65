"""Structure-aware fuzzer for a live kernel's five sockets.

Every case speaks valid ZMTP up to the point it means to break: a real handshake, then Jupyter
messages whose frames, signatures and JSON are mutated (byte flips, truncation, wrong types,
deep nesting, missing or extra frames, bad or replayed HMACs, and correctly signed nonsense so the
handlers see it), or framing the kernel must refuse (reserved flag bits, frames declaring up to
2^63 bytes, endless multipart messages, garbage greetings). Between cases it checks that the
kernel still answers: valid requests on shell and control must get their replies, the heartbeat
must echo, and no replayed request may be answered. Seeded, so a failure can be replayed.

Used by tests/kernel/test_wire_fuzz.py (a short fixed budget in CI) and benches/wire_fuzz.py
(100,000 frames and more, with RSS before and after).
"""
from __future__ import annotations

import json
import random
import socket
import time
from dataclasses import dataclass, field

from zmtp import (DELIMITER, GREETING, ConnectionClosed, LiveKernel, Peer, frame, frame_header, parse_reply,
                  ready_command, request)

# Requests a kernel answers without its engine. shutdown_request is never generated: a correctly
# signed one ends the kernel, as it should.
SHELL_TYPES = ["kernel_info_request", "is_complete_request", "history_request", "comm_info_request",
               "complete_request", "inspect_request", "execute_request", "comm_open", "comm_msg", "comm_close"]
CONTROL_TYPES = ["kernel_info_request", "interrupt_request", "debug_request"]
OTHER_TYPES = ["input_reply", "no_such_request", "", "kernel_info_reply", "execute_result"]
SOCKET_TYPE = {"shell": b"DEALER", "control": b"DEALER", "stdin": b"DEALER", "hb": b"REQ", "iopub": b"SUB"}


@dataclass
class Stats:
    frames: int = 0
    messages: int = 0
    cases: int = 0
    connections: int = 0
    dropped_by_kernel: int = 0
    probes: int = 0
    probes_answered: int = 0
    heartbeats: int = 0
    heartbeats_answered: int = 0
    replays: int = 0
    replays_answered: int = 0
    failures: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (not self.failures and self.probes_answered == self.probes
                and self.heartbeats_answered == self.heartbeats and self.replays_answered == 0)


def odd_value(rng: random.Random, depth: int = 0):
    choices = [
        lambda: None, lambda: True, lambda: rng.randint(-2**63, 2**64), lambda: rng.random() * 1e308,
        lambda: -1, lambda: 0, lambda: "", lambda: "é😀\u0000\ud7ff" * rng.randint(0, 5),
        lambda: "x" * rng.choice([1, 100, 10_000]), lambda: "*?" * rng.randint(0, 50),
        lambda: "fn main() { let x = vec![1, 2, 3]; x.len() }", lambda: "println!(\"{}\", 1",
        lambda: [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))] if depth < 3 else [],
        lambda: {rng.choice(["a", "code", "n", "cursor_pos"]): odd_value(rng, depth + 1)} if depth < 3 else {},
    ]
    return rng.choice(choices)()


def content_for(rng: random.Random, msg_type: str) -> dict:
    """Plausible content, with each field sometimes replaced by a value of the wrong type."""
    code = rng.choice(["", "let a = 1;", "fn f(", "é😀 x.", "1 +", "{", "use std::", "a" * 300])
    base = {
        "is_complete_request": {"code": code},
        "complete_request": {"code": code, "cursor_pos": rng.randint(0, len(code) + 3)},
        "inspect_request": {"code": code, "cursor_pos": rng.randint(0, len(code) + 3), "detail_level": 0},
        "history_request": {"hist_access_type": rng.choice(["tail", "range", "search", "x"]), "n": rng.randint(0, 20),
                            "output": rng.random() < 0.5, "raw": True, "session": rng.choice([0, 1, -1, 7]),
                            "start": rng.randint(0, 5), "stop": rng.randint(0, 9), "pattern": rng.choice(["*", "a?", "[", ""]),
                            "unique": rng.random() < 0.5},
        "execute_request": {"code": code, "silent": rng.random() < 0.5, "store_history": rng.random() < 0.5,
                            "user_expressions": {"e": "1"} if rng.random() < 0.3 else {}, "allow_stdin": False,
                            "stop_on_error": rng.random() < 0.5},
        "comm_open": {"comm_id": "c", "target_name": "t", "data": {}},
        "comm_msg": {"comm_id": "c", "data": {}},
        "comm_close": {"comm_id": "c", "data": {}},
        "interrupt_request": {},
        "input_reply": {"value": "v"},
    }.get(msg_type, {})
    base = dict(base)
    for key in list(base):
        if rng.random() < 0.15:
            base[key] = odd_value(rng)
    if rng.random() < 0.1:
        base[rng.choice(["code", "cursor_pos", "n", "extra"])] = odd_value(rng)
    return base


def mutate_bytes(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    op = rng.randrange(7)
    if op == 0 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:
        del b[rng.randint(0, len(b)):]
    elif op == 2:
        at = rng.randint(0, len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op == 3:
        b = bytearray(b"\xff\xfe" + bytes(b))  # invalid UTF-8
    elif op == 4:
        depth = rng.choice([10, 127, 129, 5000])
        b = bytearray(b"[" * depth + b"]" * depth)
    elif op == 5:
        b = bytearray(json.dumps(odd_value(rng)).encode())
    else:
        b = bytearray(rng.choice([b"", b"{}", b"null", b"[]", b"\"x\"", b"1e999999", b"{\"a\":"]))
    return bytes(b)


class WireFuzzer:
    def __init__(self, kernel: LiveKernel, seed: int, log=None):
        self.k = kernel
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.log = log or (lambda s: None)
        self.good = {name: Peer(kernel.ports[name]) for name in ("shell", "control")}
        self.attackers: dict[str, Peer | None] = {name: None for name in SOCKET_TYPE}
        self.answered: list[list[bytes]] = []  # valid requests already answered: replay material
        self.replayed_ids: set[str] = set()

    # -- connections ---------------------------------------------------------------------------
    def attacker(self, name: str) -> Peer:
        p = self.attackers[name]
        if p is None:
            p = Peer(self.k.ports[name], SOCKET_TYPE[name])
            if name == "iopub":
                p.send_multipart([b"\x01"])  # subscribe to everything, so the kernel writes to us
            self.attackers[name] = p
            self.stats.connections += 1
        return p

    def drain(self, name: str) -> None:
        """Reads whatever the kernel sent an attacker (a peer that never reads is another matter)."""
        p = self.attackers[name]
        if p is None:
            return
        timeout = p.sock.gettimeout()
        p.sock.setblocking(False)  # with a timeout set, recv would wait for data first
        try:
            while True:
                if not p.sock.recv(1 << 20):
                    raise ConnectionResetError
        except BlockingIOError:
            p.sock.settimeout(timeout)
        except OSError:
            self.forget(name, dropped=True)

    def forget(self, name: str, dropped: bool = False) -> None:
        p = self.attackers[name]
        if p is not None:
            p.close()
            self.attackers[name] = None
            self.stats.dropped_by_kernel += dropped

    def send(self, name: str, data: bytes, n_frames: int) -> None:
        try:
            self.attacker(name).send_raw(data)
            self.stats.frames += n_frames
            self.stats.messages += 1
        except OSError:
            self.forget(name, dropped=True)

    # -- cases -----------------------------------------------------------------------------------
    def signed_nonsense(self) -> None:
        """Correctly signed messages with odd headers and contents: the handlers must cope."""
        rng = self.rng
        name = rng.choice(["shell", "shell", "control", "stdin"])
        pool = {"shell": SHELL_TYPES, "control": CONTROL_TYPES, "stdin": ["input_reply"]}[name] + OTHER_TYPES
        msg_type = rng.choice(pool)
        _, frames = request(self.k.signer, msg_type, content_for(rng, msg_type))
        if rng.random() < 0.3:
            # Valid JSON of the wrong shape in one part (re-signed below).
            i = rng.randrange(2, 6)
            frames[i] = json.dumps(rng.choice([[], 1, "s", None, {"msg_type": 5}, {"msg_id": "x"}])).encode()
            if b"shutdown" in frames[2]:
                return
            frames[1] = self.k.signer.sign(frames[2:6])
        ids = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(0, 2))]
        buffers = [b"\0" * rng.choice([0, 1, 5000]) for _ in range(rng.choice([0, 0, 1, 3]))]
        all_frames = ids + frames + buffers
        self.send(name, b"".join(frame(f, more=i < len(all_frames) - 1) for i, f in enumerate(all_frames)), len(all_frames))
        self.drain(name)

    def mutated_message(self) -> None:
        """A valid message with its signature, JSON or frame list damaged (and not re-signed)."""
        rng = self.rng
        name = rng.choice(["shell", "control", "stdin", "shell"])
        _, frames = request(self.k.signer, rng.choice(SHELL_TYPES), {})
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(5)
            if op == 0 and len(frames) > 1:
                frames[1] = rng.choice([b"", b"00", frames[1][:-1], frames[1].upper(), mutate_bytes(rng, frames[1]),
                                        bytes(rng.randrange(256) for _ in range(64))])
            elif op == 1 and len(frames) > 2:
                i = rng.randrange(2, len(frames))
                frames[i] = mutate_bytes(rng, frames[i])
            elif op == 2 and len(frames) > 1:
                del frames[rng.randrange(len(frames))]
            elif op == 3:
                frames.insert(rng.randint(0, len(frames)), rng.choice([DELIMITER, b"", b"x" * 300]))
            else:
                frames = frames[: rng.randint(0, len(frames))] or [b""]
        self.send(name, b"".join(frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames)), len(frames))
        self.drain(name)

    def framing_attack(self) -> None:
        """ZMTP framing the kernel must refuse or survive; the connection is given up after it."""
        rng = self.rng
        name = rng.choice(list(SOCKET_TYPE))
        # An endless message (op 2) is 1,100 frames at once: rarer, so it does not make up the count.
        op = rng.choices(range(7), [8, 8, 1, 8, 8, 4, 8])[0]
        if op == 0:
            data, n = frame_header(rng.choice([2**31, 2**40, 2**50, 2**63 - 1, 2**64 - 1]), rng.random() < 0.5, long=True), 1
        elif op == 1:
            data, n = bytes([rng.randrange(8, 256), 1, 0]), 1  # reserved flag bits
        elif op == 2:
            n = 1_100
            data = frame(b"", more=True) * n
        elif op == 3:
            data, n = frame_header(1000) + b"x" * rng.randrange(1000), 1  # truncated, then closed
        elif op == 4:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            data, n = frame(body, command=True, more=rng.random() < 0.5), 1
        elif op == 5:
            data, n = frame(b"", command=True) + frame_header(2**20, command=True), 2
        else:
            data, n = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), 1
        self.send(name, data, n)
        self.forget(name, dropped=False)

    def handshake_attack(self) -> None:
        rng = self.rng
        name = rng.choice(list(SOCKET_TYPE))
        greeting = bytearray(GREETING)
        op = rng.randrange(5)
        if op == 0:
            greeting[rng.randrange(64)] = rng.randrange(256)
        elif op == 1:
            greeting[10] = rng.choice([1, 2, 4, 255])
        elif op == 2:
            greeting[12:32] = rng.choice([b"PLAIN", b"CURVE", b"GSSAPI", b"\xff" * 5]).ljust(20, b"\0")
        elif op == 3:
            greeting = greeting[: rng.randrange(64)]
        else:
            greeting += ready_command(rng.choice([b"PUB", b"ROUTER", b"NONSENSE", b""]))[: rng.randrange(40)]
        try:
            with socket.create_connection(("127.0.0.1", self.k.ports[name]), timeout=2) as s:
                s.sendall(bytes(greeting))
                s.recv(64)
        except OSError:
            pass
        self.stats.frames += 1
        self.stats.messages += 1
        self.stats.connections += 1

    def replay(self) -> None:
        if not self.answered:
            return
        frames = self.rng.choice(self.answered)
        msg_id = json.loads(frames[2])["msg_id"]
        self.replayed_ids.add(msg_id)
        self.stats.replays += 1
        name = self.rng.choice(["shell", "control"])
        self.good[name].send_multipart(frames)
        self.stats.frames += len(frames)
        self.stats.messages += 1

    # -- checks ----------------------------------------------------------------------------------
    def await_reply(self, name: str, msg_id: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        peer = self.good[name]
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = parse_reply(peer.recv_multipart(timeout=left))
            except (socket.timeout, TimeoutError):
                return None
            parent = reply["parent_header"].get("msg_id")
            if parent in self.replayed_ids:
                self.stats.replays_answered += 1
                self.stats.failures.append(f"replayed request {parent} answered")
            if parent == msg_id:
                return reply
        return None

    def probe(self) -> None:
        rng = self.rng
        name = rng.choice(["shell", "shell", "control"])
        msg_type = rng.choice(["kernel_info_request", "is_complete_request", "history_request", "comm_info_request",
                               "complete_request", "inspect_request", "execute_request"]
                              if name == "shell" else ["kernel_info_request", "interrupt_request"])
        content = {"code": "let a = 1;", "cursor_pos": 3, "hist_access_type": "tail", "n": 5, "silent": False,
                   "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}
        msg_id, frames = request(self.k.signer, msg_type, content)
        self.good[name].send_multipart(frames)
        self.stats.frames += len(frames)
        self.stats.messages += 1
        self.stats.probes += 1
        reply = self.await_reply(name, msg_id, timeout=30)
        want = msg_type.replace("_request", "_reply")
        if reply is None:
            self.stats.failures.append(f"no {want} on {name} after {self.stats.frames} frames")
        elif reply["msg_type"] != want:
            self.stats.failures.append(f"{msg_type} answered with {reply['msg_type']}")
        else:
            self.stats.probes_answered += 1
            if len(self.answered) < 1000:
                self.answered.append(frames)
        self.stats.heartbeats += 1
        try:
            self.stats.heartbeats_answered += self.k.heartbeat(timeout=10)
        except (OSError, ConnectionClosed) as e:
            self.stats.failures.append(f"heartbeat failed: {e}")

    # -- driver ----------------------------------------------------------------------------------
    def run(self, frames: int, probe_every: int = 40) -> Stats:
        cases = [(self.signed_nonsense, 30), (self.mutated_message, 40), (self.framing_attack, 12),
                 (self.handshake_attack, 5), (self.replay, 10)]
        funcs, weights = zip(*cases)
        while self.stats.frames < frames:
            if not self.k.alive():
                self.stats.failures.append(f"kernel died after {self.stats.frames} frames: exit {self.k.proc.returncode}")
                break
            try:
                self.rng.choices(funcs, weights)[0]()
                self.stats.cases += 1
                if self.stats.cases % probe_every == 0:
                    self.probe()
                    self.log(f"{self.stats.frames} frames, {self.stats.cases} cases, rss {self.k.rss_kib()} KiB")
            except (OSError, ConnectionClosed) as e:
                # The fuzzer's own connections fail only when the kernel does.
                time.sleep(0.5)
                state = "alive" if self.k.alive() else f"dead, exit {self.k.proc.returncode}"
                self.stats.failures.append(f"connection failed after {self.stats.frames} frames ({e!r}); kernel {state}")
                break
        if self.k.alive() and not self.stats.failures:
            for _ in range(5):
                self.probe()
        for name in list(self.attackers):
            self.forget(name)
        return self.stats
