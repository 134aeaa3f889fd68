"""Shared helpers of the datastore integration tests: a server on 127.0.0.1:0 in a background loop,
and the tiny index they serve (the real index via indexers.build when it exists, else the stand-in)."""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path
from typing import Any, Optional

from datastore.server import DatastoreServer, ServerOptions
from datastore.servicer import ServiceConfig

REAL_INDEX = importlib.util.find_spec("datastore.index") is not None and \
    importlib.util.find_spec("indexers.build") is not None


class ServerThread:
    """A DatastoreServer running in its own event loop thread."""

    def __init__(self, index_path, config: Optional[ServiceConfig] = None, options: Optional[ServerOptions] = None,
                 opener=None, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DatastoreServer(str(index_path), config or ServiceConfig(), options or ServerOptions(),
                                      opener=opener)
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
