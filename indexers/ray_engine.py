"""``index-build build --engine ray``: tokenisation and the per-shard suffix arrays as Ray tasks.

The driver (the ``index-build`` process) keeps everything that decides the index's bytes and its durability:
it reads the documents (``readers.py``), cuts token shards in document order, writes every file through
``datastore/durable.py`` into the staging folder and sets the stage markers. Ray tasks only compute, and a
task's result is written by the driver when it arrives. So the files are byte-identical to the local
engine's, and resume, ``--append``, the build lock and the atomic publish are the local engine's code paths
(a build interrupted under one engine resumes under the other: the engine is not part of the resume key).

What travels through the object store:

* encode task: one tokenizer batch of document texts (``batch_docs`` documents or 4 MiB of text) -> its
  token arrays (uint32). At most ``2 x CPUs`` batches are in flight, so the object store holds a bounded
  window of the corpus, never all of it. The tokenizer (its JSON) is put once and cached per worker process.
* suffix array task: one shard's token array -> (reverse suffix array, buckets). At most one shard per CPU
  in flight.

Workers therefore need no access to the inputs or to the output folder (no shared file system), only the
same specstore version installed. Chunk embeddings and FAISS stay in the driver: the encoder would travel
to every worker (~90 MB) and the FAISS build is one process's work anyway.

Ray itself is an optional dependency (the ``shared`` extra) imported only here, only when the engine is used.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Optional

import numpy as np

from ..datastore.suffix_shard import build_buckets, build_reverse_sa
from .build import BuildError, EngineTaskFailed, _crash_point, _encode

#: tokenizer key -> tokenizers.Tokenizer, per Ray worker process (a worker runs many encode tasks)
_WORKER_TOKENIZERS: dict = {}


# ------------------------------------------------------------------------------------------ task bodies
def encode_task(tok_key: str, tok_box: list, texts: list, crash_at: Optional[str] = None) -> list:
    """Ray task: ``texts`` (str) -> their token arrays (uint32, no special tokens), as the local engine's
    ``_encode``. ``tok_box`` is ``[ObjectRef of the tokenizer JSON]``: boxed so that Ray does not fetch it for
    every task, only on a worker's first (the tokenizer is then cached under ``tok_key``)."""
    _crash_point("ray-encode", crash_at)
    tok = _WORKER_TOKENIZERS.get(tok_key)
    if tok is None:
        import ray
        from tokenizers import Tokenizer

        # one task per CPU already: the tokenizer's own thread pool would oversubscribe the node
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tok = _WORKER_TOKENIZERS[tok_key] = Tokenizer.from_str(ray.get(tok_box[0]))
    return _encode(tok, texts)


def suffix_array_task(name: str, tokens: np.ndarray, vocab_size: int,
                      crash_at: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Ray task: one shard's token array [n] -> (reverse suffix array [n], buckets), as the local engine."""
    _crash_point(f"ray-sa:{name}", crash_at)
    return build_reverse_sa(tokens), build_buckets(tokens, vocab_size)


# ------------------------------------------------------------------------------------------ the engine
def import_ray():
    """The ``ray`` module, or BuildError in one line where it is not installed."""
    try:
        import ray
    except ImportError:
        raise BuildError("--engine ray needs the ray package: pip install 'specstore[shared]' "
                         "(or use the default --engine local)") from None
    return ray


def _cause(err: BaseException) -> str:
    """One line saying why a Ray call failed: the task's own exception when it raised one."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


class RayEngine:
    """A connection to Ray for one build: a local instance it starts (and stops in ``close``) or a cluster.

    address: a Ray cluster address (``ray://head:10001``, ``head:6379`` or ``auto``); None = start a local
        instance on 127.0.0.1 with ``num_cpus`` CPUs (None = every core), no dashboard, quiet logs.
    A Ray already initialised in this process (a test's, an application's) is used as it is and left running.
    """

    def __init__(self, address: Optional[str], num_cpus: Optional[int], crash_at: Optional[str] = None):
        self.ray = ray = import_ray()
        self.crash_at = crash_at
        self.owned = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no report to the usage-stats server
            # Ray's default for a new local instance (token authentication, the token in ~/.ray) is what we
            # want; its warning that it is on would be the only line a quiet build prints
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            quiet = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            try:
                if address:
                    ray.init(address=address, **quiet)
                else:
                    ray.init(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **quiet)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise BuildError(f"--engine ray: cannot start or reach {where}: {_cause(e)}") from None
            self.owned = True
        #: CPUs of the cluster: the number of tasks worth keeping in flight
        self.width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._encode = ray.remote(num_cpus=1)(encode_task)
        self._sa = ray.remote(num_cpus=1)(suffix_array_task)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False

    def get(self, ref, what: str):
        """``ray.get(ref)``, a failure said in one line as EngineTaskFailed naming ``what``."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            raise EngineTaskFailed(f"Ray task {what} failed: {_cause(e)}") from None

    def encoder(self, backend) -> "RayEncoder":
        return RayEncoder(self, backend)

    def suffix_arrays(self, shards: Iterable[tuple[str, Callable[[], np.ndarray]]], vocab_size: int,
                      on_done: Callable[[str, np.ndarray, np.ndarray], None]) -> None:
        """Run one suffix array task per ``(name, load_tokens)`` with at most ``width`` in flight, calling
        ``on_done(name, rsa, buckets)`` in the driver as each finishes (in completion order)."""
        pending: dict = {}

        def finish_one():
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            name = pending.pop(ref)
            rsa, buckets = self.get(ref, f"suffix array of {name}")
            on_done(name, rsa, buckets)

        try:
            for name, load_tokens in shards:
                while len(pending) >= self.width:
                    finish_one()
                pending[self._sa.remote(name, load_tokens(), vocab_size, self.crash_at)] = name
            while pending:
                finish_one()
        finally:
            for ref in pending:   # a failure elsewhere: stop the work nobody will read
                self.ray.cancel(ref)


class RayEncoder:
    """The tokenize stage's encoder on Ray (same interface as ``build._PoolEncoder``): ``submit(texts)`` ->
    handle, ``result(handle)`` -> token arrays, ``width`` = batches worth keeping in flight / 2, ``close()``."""

    def __init__(self, engine: RayEngine, backend):
        import hashlib

        tok_json = backend.to_str()
        self.engine = engine
        self.width = engine.width
        self._key = hashlib.sha256(tok_json.encode()).hexdigest()[:16]
        self._box = [engine.ray.put(tok_json)]
        self._pending: set = set()

    def submit(self, texts: list):
        ref = self.engine._encode.remote(self._key, self._box, texts, self.engine.crash_at)
        self._pending.add(ref)
        return ref

    def result(self, ref) -> list:
        self._pending.discard(ref)
        return self.engine.get(ref, "encode (tokenizer batch)")

    def close(self) -> None:
        for ref in self._pending:
            self.engine.ray.cancel(ref)
        self._pending.clear()
