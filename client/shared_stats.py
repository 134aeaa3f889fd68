"""A decoder's side of the fleet's shared statistics (PushStats / PullStats, datastore/ngram_stats.py).

``StatsPusher`` sends batches of observations from a background thread, off the decode path: each batch
gets an idempotency id (``<node id>-<n>``) that its retries reuse, so the service applies it once even
when an answer is lost; a batch that keeps failing is retried with backoff until ``max_attempts``; the
queue is bounded (the oldest batch goes first, counted in ``stats["dropped"]``) so that a datastore that is
down never grows the decoder's memory.

``StatsSharer`` is a Drafter (client/types.py) that drafts nothing: its hooks collect, at every step,
the target's top-k next tokens at every verified node and the accepted tokens with their preceding
context, and hand them to the pusher every ``flush_steps`` steps and at the end of each request; with
``share_outputs`` (opt-in: outputs may be private) the finished generation too. With a
``RecyclingDrafter`` it first warm-starts that drafter's table from the fleet's rows (``warm_start``):
a node that starts cold drafts from what the others learned at once.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from ..protos import datastore_pb2 as pb
from .types import DecodeContext, Drafter, DraftTree, Source, StepResult

log = logging.getLogger("specstore.shared_stats")

ORDER = 3      # the service's n-gram order: a run carries ORDER - 1 tokens of context before its new tokens
MAX_OUTPUT = 16_384   # tokens of one shared output (the service's limit; a longer one sends its end)


class StatsPusher:
    """Background, idempotent, bounded pushes of ``PushStatsRequest`` batches through a DatastoreClient."""

    def __init__(self, client, *, node_id: Optional[str] = None, max_queue: int = 64, max_attempts: int = 8,
                 backoff_s: float = 0.2, timeout_s: float = 2.0):
        self.client = client
        self.node_id = node_id or secrets.token_hex(8)
        self.max_attempts, self.backoff_s, self.timeout_s = int(max_attempts), float(backoff_s), float(timeout_s)
        self.stats: Counter = Counter()
        self.version = 0
        self._seq = 0
        self._queue: "collections.deque" = collections.deque(maxlen=int(max_queue))
        self._cv = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="stats-push", daemon=True)
        self._thread.start()

    def push(self, rows: Sequence[tuple], runs: Sequence[tuple], outputs: Sequence[Sequence[int]] = (),
             row_blocks: Sequence[tuple] = ()) -> None:
        """Queue one batch: rows [(token, next tokens, probs)], runs [(tokens, new_from)], outputs [tokens],
        row_blocks [(tokens [n], next tokens [n, k], probs [n, k]) arrays]: rows too, turned into the message in
        the pusher's thread (the caller, a decode loop, only hands over arrays). Its batch id is fixed here."""
        if not rows and not runs and not outputs and not row_blocks:
            return
        self._seq += 1
        item = (f"{self.node_id}-{self._seq}", rows, runs, outputs, row_blocks)
        with self._cv:
            if len(self._queue) == self._queue.maxlen:
                self.stats["dropped"] += 1
            self._queue.append(item)
            self._cv.notify()

    @staticmethod
    def _message(item) -> "pb.PushStatsRequest":
        batch_id, rows, runs, outputs, blocks = item
        all_rows = list(rows)
        for toks, tk, tp in blocks:
            all_rows.extend(zip(np.asarray(toks).tolist(), np.asarray(tk).tolist(), np.asarray(tp, np.float64).tolist()))
        return pb.PushStatsRequest(
            batch_id=batch_id,
            rows=[pb.TopkRow(token=int(t), next_tokens=n, probs=ps) for t, n, ps in all_rows],
            runs=[pb.TokenRun(tokens=[int(x) for x in toks], new_from=int(nf)) for toks, nf in runs],
            outputs=[pb.Output(tokens=[int(x) for x in out]) for out in outputs])

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                self._send(self._message(item))
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _send(self, req) -> None:
        for attempt in range(self.max_attempts):
            try:
                applied, self.version = self.client.push_stats(req, timeout_s=self.timeout_s)
                self.stats["pushed" if applied else "duplicates"] += 1
                return
            except Exception as e:  # noqa: BLE001 - any failure: retry the same batch id later
                self.stats["retries"] += 1
                code = getattr(e, "code", lambda: None)()
                if code is not None and code.name in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED",
                                                      "FAILED_PRECONDITION", "UNIMPLEMENTED"):
                    self.stats["refused"] += 1
                    log.warning("shared statistics push refused (%s): %s", code.name,
                                getattr(e, "details", lambda: e)())
                    return
                if self._closing and attempt >= 1:
                    break
                time.sleep(min(5.0, self.backoff_s * 2 ** attempt))
        self.stats["failed"] += 1

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued batch was sent (or given up); False on timeout."""
        end = time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout_s)


class StatsSharer(Drafter):
    """Feeds the fleet's statistics from this decoder and warm-starts a recycling table from them."""

    source = Source.NONE
    needs_target_topk = True

    def __init__(self, client, *, recycling=None, flush_steps: int = 16, topk: int = 8, node_id: Optional[str] = None,
                 pusher: Optional[StatsPusher] = None, share_outputs: bool = False):
        self.client = client
        self.recycling = recycling
        self.flush_steps = int(flush_steps)
        self.topk = int(topk)
        self.pusher = pusher or StatsPusher(client, node_id=node_id)
        self._rows: list = []
        self._runs: list = []
        self._steps = 0
        self.warm_rows = 0
        # opt-in (outputs may be private): each finished generation also goes to the service's recent outputs;
        # set per request by assigning share_outputs before it starts
        self.share_outputs = bool(share_outputs)
        self._output: list = []

    def warm_start(self, max_pages: int = 64) -> int:
        """Load the fleet's order-1 rows into the recycling drafter's table (rows it has not learned itself
        yet); returns how many rows were loaded. A failure leaves the table as it was (logged)."""
        if self.recycling is None:
            return 0
        since, loaded = 0, 0
        try:
            for _ in range(max_pages):
                rows, since, more = self.client.pull_stats(since)
                loaded += self.recycling.warm_rows(rows)
                if not more:
                    break
        except Exception as e:  # noqa: BLE001 - a cold start is the fallback, never an error
            log.warning("shared statistics warm start failed: %s", e)
        self.warm_rows += loaded
        return loaded

    def propose(self, ctx: DecodeContext, budget: int) -> DraftTree:
        return DraftTree.empty(ctx.last_token)

    def observe(self, step: StepResult) -> None:
        topk_t, topk_p = step.node_topk_tokens, step.node_topk_probs
        if topk_t is not None and len(topk_t):
            # every verified node, as Token Recycling's own table learns: the target's top-k after a node is
            # right for that node's path, accepted or not. Arrays only here: the pusher's thread builds rows
            k = min(self.topk, topk_t.shape[1])
            self._rows.append((np.array(step.tree.tokens), np.array(topk_t[:, :k]), np.array(topk_p[:, :k])))
        if self.share_outputs:
            self._output.extend(np.asarray(step.new_tokens).tolist())
        if step.context is not None and len(step.new_tokens):
            before = np.asarray(step.context.tokens)[-ORDER + 1:]
            run = np.concatenate([before, np.asarray(step.new_tokens)])
            if len(run) >= 2:
                self._runs.append((run.tolist(), max(1, len(before))))
        self._steps += 1
        if self._steps >= self.flush_steps:
            self._flush()

    def _flush(self) -> None:
        rows, runs, self._rows, self._runs, self._steps = self._rows, self._runs, [], [], 0
        # consecutive steps' runs are one run: the service counts the same n-grams from fewer tokens
        merged: list = []
        for toks, nf in runs:
            if merged and len(merged[-1][0]) + len(toks) <= 4000 and merged[-1][0][-(ORDER - 1):] == toks[:nf]:
                merged[-1] = (merged[-1][0] + toks[nf:], merged[-1][1])
            else:
                merged.append((toks, nf))
        blocks, n = [], 0
        for b in rows:                     # at most 4096 rows per batch (the service's limit)
            if n + len(b[0]) > 4096 and blocks:
                self.pusher.push([], merged, row_blocks=blocks)
                blocks, n, merged = [], 0, []
            blocks.append(b)
            n += len(b[0])
        self.pusher.push([], merged, row_blocks=blocks)

    def begin_request(self, prompt_ids=None, prompt_text=None) -> None:
        self._output = []

    def end_request(self) -> None:
        if self._rows or self._runs:
            self._flush()
        out, self._output = self._output[-MAX_OUTPUT:], []
        if self.share_outputs and len(out) >= 2:
            self.pusher.push([], [], [out])

    def close(self) -> None:
        self.end_request()
        self.pusher.close()
