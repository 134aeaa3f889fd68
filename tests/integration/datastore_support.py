"""Shared helpers of the datastore integration tests: a server on 127.0.0.1:0 in a background loop,
and the tiny index they serve (the real index via indexers.build when it exists, else the stand-in)."""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path
from typing import Any, Optional

from specstore.bench.serve_process import ServeProcess  # noqa: F401 - the tests' real server process
from specstore.datastore.server import DatastoreServer, ServerOptions
from specstore.datastore.servicer import ServiceConfig

REAL_INDEX = importlib.util.find_spec("specstore.datastore.index") is not None and \
    importlib.util.find_spec("specstore.indexers.build") is not None


class ServerThread:
    """A DatastoreServer running in its own event loop thread."""

    def __init__(self, index_path, config: Optional[ServiceConfig] = None, options: Optional[ServerOptions] = None,
                 opener=None, load: bool = True, stats=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DatastoreServer(str(index_path), config or ServiceConfig(), options or ServerOptions(),
                                      opener=opener, stats=stats)
        self.port = self.call(self.server.start(load=load))
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def reloading_server(tmp_path: Path, docs, fingerprint: str) -> tuple[ServerThread, Any]:
    """A server (``--reload`` every 0.1 s, old snapshots closed 0.5 s after a swap) on snapshot "snap-a" of
    ``docs``, published behind the symlink ``tmp_path/current``, and a function that publishes "snap-b" (the
    same documents plus [2, 3, 42, 43], so that context [2, 3] drafts 42 only from it) by an atomic swap."""
    from tests.datastore_fake_index import FakeIndex, write_fake_index

    a = write_fake_index(tmp_path / "snap-a", docs, index_id="snap-a", fingerprint=fingerprint)
    b = write_fake_index(tmp_path / "snap-b", [*docs, [2, 3, 42, 43]], index_id="snap-b", fingerprint=fingerprint)
    link = tmp_path / "current"
    link.symlink_to(a)

    def publish_b() -> None:
        tmp = tmp_path / "current.tmp"
        tmp.symlink_to(b)
        tmp.replace(link)   # atomic publish

    opts = ServerOptions(reload=True, reload_interval_s=0.1, retire_after_s=0.5)
    return ServerThread(link, ServiceConfig(), opts, opener=FakeIndex.open), publish_b


def make_certificates(folder: Path, ca_name: str, *leaves: str) -> dict:
    """A throw-away CA ``ca_name`` and leaf certificates it signs (EC P-256, valid one day, made with the
    ``openssl`` command): ``{"ca": ca.pem, leaf: (cert.pem, key.pem), ...}`` under ``folder``. Each leaf is
    good for localhost / 127.0.0.1 as a server and as a client (mutual TLS)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca = folder / f"{ca_name}.key", folder / f"{ca_name}.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            str(ca_key), "-out", str(ca), "-days", "1", "-subj", f"/CN={ca_name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ext = folder / "leaf.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=CA:FALSE\n")
    out: dict = {"ca": ca}
    for leaf in leaves:
        key, csr, cert = folder / f"{leaf}.key", folder / f"{leaf}.csr", folder / f"{leaf}.pem"
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                "-out", str(csr), "-subj", f"/CN={leaf}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                "-out", str(cert), "-days", "1", "-extfile", str(ext))
        out[leaf] = (cert, key)
    return out


def stop_at_step(server, at: int):
    """A drafter that drafts nothing and stops ``server`` (a ServerThread) at its ``at``-th step: a datastore
    that dies in the middle of a generation. ``.n`` counts the steps it saw."""
    from specstore.client.types import Drafter, DraftTree

    class _StopAt(Drafter):
        def __init__(self):
            self.n = 0

        def propose(self, ctx, budget):
            self.n += 1
            if self.n == at:
                server.stop()
            return DraftTree.empty(ctx.last_token)

    return _StopAt()
