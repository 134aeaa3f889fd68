"""A TCP proxy on 127.0.0.1 that injects network faults between a client and a real ``datastore-serve``.

The server stays production code: faults that a process signal cannot make (a slow link, connections
reset) are made here, on the bytes. Modes, switched at any time with ``set_mode``:

- ``pass``:  bytes go through unchanged.
- ``delay``: every chunk read from either side is held ``delay_s`` seconds before it is forwarded (a slow
  network or a server that answers late; HTTP/2 pings are delayed too, as they would be).
- ``reset``: open connections are reset (RST, SO_LINGER 0) and new ones are reset as soon as accepted
  (a server or load balancer that refuses every call: the client sees UNAVAILABLE).

``upstream`` can be changed too (a restarted server on another port): new connections go there, open
ones keep their old peer until it closes them.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """``FaultProxy(upstream="127.0.0.1:PORT")``; clients connect to ``.address``. Threads are daemons;
    ``close()`` stops accepting and resets every open connection."""

    def __init__(self, upstream: str, mode: str = "pass", delay_s: float = 0.0):
        self.upstream = upstream
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.mode, self.delay_s = "pass", 0.0
        self.set_mode(mode, delay_s)
        self.accepted = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True).start()

    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in ("pass", "delay", "reset"):
            raise ValueError(f"unknown proxy mode {mode!r}: pass, delay or reset")
        self.mode, self.delay_s = mode, float(delay_s)
        if mode == "reset":
            self._reset_all()

    def _reset_all(self) -> None:
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _reset(client)
                continue
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=2.0)
                server.settimeout(None)
            except OSError:
                _reset(client)   # as a dead server would: connection refused, seen as a reset
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(client, server, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if self.mode == "delay" and self.delay_s > 0:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            mine = pair in self._pairs
            self._pairs.discard(pair)
        if mine:   # the first pump to stop closes both sides (the other one's recv then fails)
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        self._reset_all()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

