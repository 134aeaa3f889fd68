"""The product's drafting as a vLLM speculative proposer (``method: custom_class``).

    from vllm import LLM
    llm = LLM(model=HF_FOLDER, speculative_config={
        "method": "custom_class", "num_speculative_tokens": 8,
        "model": "specstore.client.vllm_proposer.SpecstoreProposer"})
    # or: vllm serve HF_FOLDER --speculative-config '{"method": "custom_class", ...}'

Configured without code, by environment variables (read when vLLM builds the proposer, in its worker
process) or a JSON file named by ``SPECSTORE_VLLM_CONFIG`` holding the same keys in lower case without the
prefix (``{"datastore": "host:port", "timeout_ms": 5}``); the variables win over the file:

  SPECSTORE_DATASTORE=HOST:PORT   the shared datastore service (gRPC)          } at most one of
  SPECSTORE_INDEX=DIR             an index opened in process (embedded)        } these two
  SPECSTORE_DRAFTERS=context,datastore   which sources to fuse (default: context, + datastore if configured)
  SPECSTORE_TIMEOUT_MS=5          deadline of one engine step's batched datastore lookup
  SPECSTORE_DOCUMENTS=1           sessions search the prompt's FAISS documents (when the index has them)
  SPECSTORE_MEMORY=1              sessions also match inside each request's own tokens
  SPECSTORE_TOKEN_COST=0.02       prior verify cost of one more draft token per running request, relative to
                                  a plain engine step; replaced by the step cost measured online (the time
                                  between engine steps against the tokens they verified), so chains get
                                  shorter where verifying drafts is dear and as the batch grows; a step in
                                  which no request expects to gain more than speculation's own overhead
                                  (also measured) drafts nothing (but one in 8 such steps, to keep measuring)
  SPECSTORE_SHARE_STATS=0         push each request's accepted tokens (as n-gram runs, in batches from a
                                  background thread) to the service's shared statistics, so that what this
                                  node generates drafts for every node (needs SPECSTORE_DATASTORE and a
                                  server with --stats-dir; up to 15 last tokens of a request are not sent)
  SPECSTORE_SHARE_OUTPUTS=0       push each finished request's generated tokens to the service's recent shared
                                  outputs (matched by every node's lookups; opt-in for the whole node: outputs
                                  may be private; needs SPECSTORE_DATASTORE; at most the last 16,384 tokens)
  SPECSTORE_AUTH_TOKEN=T          bearer token for the datastore's session calls (and pushes)
  SPECSTORE_TLS_CA=PEM            TLS to the datastore, trusting this CA
  SPECSTORE_TLS_CERT=PEM, SPECSTORE_TLS_KEY=PEM   client certificate and key (mutual TLS: --tls-client-ca)
  SPECSTORE_STATS_FILE=PATH       keep the proposer's counters there (JSON, rewritten when a request starts
                                  or ends): requests started/released, live and most live, drafts, errors,
                                  and the datastore client's counts (``extra.datastore``: lookups, failures,
                                  calls skipped while its breaker was open)

Per engine step ``propose`` sees batch rows, not request ids. A request is followed by the key (row, hash
of its first tokens) and by what the row held at its last step (token count and last token): a row that
changes hands (the head differs, or the row shrank or no longer holds that token; e.g. a new request with
the same system prompt) no longer holds its request. A request found at another row in the same step
(vLLM compacts the batch when requests finish) moves with its state; one seen nowhere has ended: its state
is released (its datastore session is closed). Every running request's lookup travels in one ``RetrieveBatch`` call
(remote) or runs in process (embedded); its tree is fused with the context drafter's by longest prefix,
calibrated by the acceptance learned so far (what vLLM accepted of earlier chains, read back from the
tokens that follow), and the best chain is kept. Fail-soft: a slow or dead datastore costs its drafts for
that step (deadline), never a stalled step or a changed output; vLLM verifies every draft. Sessions open in
the background (a request drafts without its session until it is there) and close without waiting; a
session the service lost (a restart) is opened again with the request's tokens so far.

vLLM calls this interface experimental: it is pinned (``VLLM_VERSION``), and
``tests/vllm/test_vllm_proposer.py`` fails loudly when the runner's call changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .budget import BudgetController, CostProfile, StepCostModel
from .datastore_drafter import MAX_REOPEN
from .drafters.context import ContextDrafter
from .fusion import fuse
from .types import DecodeContext, DraftTree

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"   # the release whose custom_class call this adapter is written and tested against
_KEY_TOKENS = 32          # a request's identity: its row and a hash of this many first tokens
_FUSE_BUDGET = 64         # nodes kept of the fused tree before the chain is chosen
_SLOW_PROPOSE_S = 0.25    # a propose() this slow is not observed as an engine step (see propose)
_EXPLORE = 8              # one in this many steps that would be declined for the overhead drafts anyway


@dataclass
class ProposerOptions:
    """What ``SPECSTORE_*`` variables (or the ``SPECSTORE_VLLM_CONFIG`` JSON file) configure."""

    datastore: Optional[str] = None
    index: Optional[str] = None
    drafters: Optional[str] = None
    timeout_ms: float = 5.0
    documents: bool = True
    memory: bool = True
    token_cost: float = 0.02
    auth_token: Optional[str] = None
    tls_ca: Optional[str] = None      # PEM files: TLS to the datastore, and a client certificate (mutual TLS)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    top_k: int = 8
    stats_file: Optional[str] = None
    share_stats: bool = False
    share_outputs: bool = False

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "ProposerOptions":
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        cfg = env.get("SPECSTORE_VLLM_CONFIG")
        if cfg:
            try:
                raw.update(json.loads(Path(cfg).read_text()))
            except (OSError, ValueError) as e:
                raise ValueError(f"SPECSTORE_VLLM_CONFIG={cfg}: cannot read it as JSON ({e})") from e
        for f in fields(cls):
            v = env.get(f"SPECSTORE_{f.name.upper()}")
            if v not in (None, ""):
                raw[f.name] = v
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown specstore vLLM option(s): {sorted(unknown)}")
        opts = cls()
        for f in fields(cls):
            if f.name in raw:
                setattr(opts, f.name, _convert(raw[f.name], getattr(cls, f.name, None)))
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.datastore and self.index:
            raise ValueError("set one of SPECSTORE_DATASTORE (a service) or SPECSTORE_INDEX (in process), not both")
        if self.timeout_ms <= 0 or self.token_cost < 0:
            raise ValueError("SPECSTORE_TIMEOUT_MS must be > 0 and SPECSTORE_TOKEN_COST >= 0")
        names = self.drafter_names()
        bad = names - {"context", "datastore"}
        if bad:
            raise ValueError(f"SPECSTORE_DRAFTERS: unknown drafter(s) {sorted(bad)}; choose from context, datastore")
        if self.share_stats and not self.datastore:
            raise ValueError("SPECSTORE_SHARE_STATS needs SPECSTORE_DATASTORE (the statistics are the service's)")
        if self.share_outputs and not self.datastore:
            raise ValueError("SPECSTORE_SHARE_OUTPUTS needs SPECSTORE_DATASTORE (the shared outputs are the service's)")
        if "datastore" in names and not (self.datastore or self.index):
            raise ValueError("SPECSTORE_DRAFTERS names datastore, but neither SPECSTORE_DATASTORE nor SPECSTORE_INDEX is set")

    def drafter_names(self) -> set[str]:
        if self.drafters:
            return {d.strip() for d in self.drafters.split(",") if d.strip()}
        return {"context", "datastore"} if (self.datastore or self.index) else {"context"}


def _convert(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, float):
        return float(value)
    if isinstance(default, int):
        return int(value)
    return None if value is None else str(value)


@dataclass
class _Request:
    """One running request's drafting state, from its first engine step to its end."""

    key: tuple
    context: ContextDrafter
    session_id: Optional[str] = None
    text: Optional[str] = None          # the prompt's text, for document search (None: no documents)
    seen: int = 0                       # the row's token count at its last step ...
    last: int = -1                      # ... and its last token then: a row that shrank or changed it is new
    chain: Optional[DraftTree] = None   # the chain proposed at the last step ...
    chain_at: int = 0                   # ... after this many tokens
    pushed: int = -1                    # tokens already sent to the shared statistics (-1: not yet seen)
    output: list = field(default_factory=list)   # generated tokens so far (SPECSTORE_SHARE_OUTPUTS) ...
    output_at: int = -1                 # ... up to this token count (-1: not yet seen; the prompt is not kept)
    opening: Any = None                 # its session being opened (poll() says when it is there)
    reopened: int = 0                   # sessions opened again after the service lost one


@dataclass
class ProposerStats:
    steps: int = 0
    rows: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    requests_started: int = 0
    requests_released: int = 0
    live_requests: int = 0
    max_live_requests: int = 0
    datastore_seconds: float = 0.0
    errors: int = 0
    extra: dict = field(default_factory=dict)


class SpecstoreProposer:
    """vLLM ``custom_class`` proposer: built by vLLM with its ``VllmConfig``."""

    def __init__(self, vllm_config: Any, options: Optional[ProposerOptions] = None, backend: Any = None):
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.options = options or ProposerOptions.from_env()
        names = self.options.drafter_names()
        self.use_context = "context" in names
        self._tokenizer = None      # the engine's tokenizer: prompt text for document search
        self._documents = False     # the datastore can search documents for a prompt
        self.backend = backend
        if self.backend is None and "datastore" in names:
            self.backend = self._open_backend(vllm_config)
        self.controller = BudgetController(CostProfile.flat(self.k + 1), max_budget=self.k)
        self.step_cost = StepCostModel(prior_token_cost=self.options.token_cost)
        self._would_decline = 0     # steps whose drafts could not pay speculation's overhead
        self._last_step: Optional[tuple[float, int, bool]] = None   # (start, tokens verified, speculated) of the last step
        self.stats = ProposerStats()
        self._requests: dict[int, _Request] = {}   # row -> state
        self.pusher = None          # client/shared_stats.py StatsPusher (SPECSTORE_SHARE_STATS)
        self._runs: list = []       # accepted-token runs not yet handed to the pusher
        if (self.options.share_stats or self.options.share_outputs) and self.backend is not None \
                and self.backend.remote:
            from .shared_stats import StatsPusher

            self.pusher = StatsPusher(self.backend.client)
        log.info("specstore proposer: k=%d, drafters=%s, datastore=%s", self.k, sorted(names),
                 self.options.datastore or self.options.index or "-")

    # ------------------------------------------------------------------ set-up
    def _open_backend(self, vllm_config: Any):
        """The datastore backend, checked against the engine's tokenizer (a mismatch is a config error)."""
        from ..datastore.tls import client_tls_options
        from .datastore_drafter import make_datastore_drafter

        tok = self._load_tokenizer(vllm_config)
        drafter = make_datastore_drafter(
            address=self.options.datastore, index_path=self.options.index, tokenizer=tok,
            documents=self.options.documents, memory=self.options.memory, top_k=self.options.top_k,
            timeout_s=self.options.timeout_ms / 1000.0, auth_token=self.options.auth_token, strict=False,
            **client_tls_options(self.options.tls_ca, self.options.tls_cert, self.options.tls_key))
        self._documents = drafter.documents
        return drafter.backend

    def _load_tokenizer(self, vllm_config: Any):
        from ..datastore.model_files import load_tokenizer

        path = getattr(vllm_config.model_config, "tokenizer", None) or vllm_config.model_config.model
        self._tokenizer = load_tokenizer(str(path))
        return self._tokenizer

    def load_model(self, *args, **kwargs) -> None:
        """vLLM hands every proposer the target model; drafting needs none of it."""

    # ------------------------------------------------------------------ per request
    @staticmethod
    def request_key(row: int, tokens: np.ndarray, length: Optional[int] = None) -> tuple:
        """(row, L, hash of the first L tokens); L is fixed when the request is first seen, so that the
        key stays the same while the request grows."""
        length = min(_KEY_TOKENS, len(tokens)) if length is None else length
        head = np.ascontiguousarray(tokens[:length], dtype=np.int64)
        return row, length, hashlib.blake2b(head.tobytes(), digest_size=8).hexdigest()

    def _begin(self, key: tuple, tokens: np.ndarray) -> _Request:
        req = _Request(key=key, context=ContextDrafter())
        self.stats.requests_started += 1
        if self.backend is not None and (self.options.memory or self.options.documents):
            text = None
            if self.options.documents and self._documents and self._tokenizer is not None:
                try:
                    text = self._tokenizer.decode(tokens.tolist())
                except Exception:  # noqa: BLE001 - no text, no document search
                    text = None
            req.text = text
            self._open(req, tokens)
        return req

    def _open(self, req: _Request, tokens: np.ndarray) -> None:
        """Start opening ``req``'s session (seeded with ``tokens``); never waits for a remote service."""
        memory = self.options.memory and self.backend.remote
        if not (memory or req.text):
            return
        try:
            opener = getattr(self.backend, "open_session_async", None)
            if opener is None:
                req.session_id = self.backend.open_session(tokens, req.text, self.options.top_k, memory=memory,
                                                           documents=bool(req.text))
            else:
                req.opening = opener(tokens, req.text, self.options.top_k, memory=memory, documents=bool(req.text))
        except Exception as e:  # noqa: BLE001
            self._error("datastore session", e)

    def _sessions_step(self, live: list) -> None:
        """Adopt the sessions that have opened since the last step (before this step's lookups)."""
        for _, req, _ in live:
            if req.opening is not None:
                done, sid = req.opening.poll(0.0)
                if done:
                    req.opening, req.session_id = None, sid

    def _reopen_lost(self, live: list) -> None:
        """Open again the sessions that the service refused this step's lookups for (it restarted)."""
        lost = getattr(self.backend, "session_lost", None)
        if lost is None:
            return
        for _, req, tokens in live:
            if req.session_id and lost(req.session_id):
                req.session_id = None
                if req.reopened < MAX_REOPEN:
                    req.reopened += 1
                    self.stats.extra["sessions_reopened"] = self.stats.extra.get("sessions_reopened", 0) + 1
                    self._open(req, tokens)

    def _end(self, req: _Request) -> None:
        self.stats.requests_released += 1
        if self.pusher is not None and len(req.output) >= 2:
            from .shared_stats import MAX_OUTPUT

            self.pusher.push([], [], [req.output[-MAX_OUTPUT:]])   # its thread sends it
            req.output = []
        if req.opening is not None:   # closed by the client when it arrives
            req.opening.cancel()
            req.opening = None
        if req.session_id and self.backend is not None:
            try:
                self.backend.close_session(req.session_id)
            except Exception as e:  # noqa: BLE001
                self._error("datastore session close", e)

    def _sync(self, n_rows: int, num_tokens: np.ndarray, token_ids: np.ndarray) -> list[_Request]:
        """Follow requests across steps: the requests whose row no longer holds them (changed hands, or gone).

        They are not ended yet: vLLM moves running requests between rows when others finish, so a request
        seen at a new row is adopted (``_adopt``) and the rest are ended after the step (``_end``)."""
        lost = []
        for row in list(self._requests):
            req = self._requests[row]
            n = int(num_tokens[row]) if row < n_rows else 0
            if row >= n_rows or not self._holds(req, token_ids[row, :n], row):
                lost.append(self._requests.pop(row))
        return lost

    def _holds(self, req: _Request, tokens: np.ndarray, row: int) -> bool:
        """Whether ``tokens`` (a row's tokens now) continue ``req``: same head, not shorter, same last token."""
        n = len(tokens)
        if n < max(req.key[1], req.seen) or (req.seen and int(tokens[req.seen - 1]) != req.last):
            return False
        return self.request_key(row, tokens, req.key[1])[1:] == req.key[1:]

    def _adopt(self, lost: list[_Request], row: int, tokens: np.ndarray) -> Optional[_Request]:
        """A request of ``lost`` that ``tokens`` continue, moved to ``row`` (taken out of ``lost``)."""
        for i, req in enumerate(lost):
            if self._holds(req, tokens, row):
                req.key = (row, *req.key[1:])
                return lost.pop(i)
        return None

    def _learn(self, req: _Request, tokens: np.ndarray) -> None:
        """What vLLM accepted of the last chain: the drafts that the tokens after it repeat."""
        chain, at = req.chain, req.chain_at
        req.chain = None
        if chain is None or chain.num_drafts == 0 or len(tokens) <= at:
            return
        new = tokens[at:]
        drafts = chain.tokens[1:]
        m = min(len(new) - 1, len(drafts))   # the last new token is vLLM's own (bonus or correction)
        acc = 0
        while acc < m and int(new[acc]) == int(drafts[acc]):
            acc += 1
        self.controller.observe(chain, list(range(acc + 1)))
        self.stats.accepted_tokens += acc

    # ------------------------------------------------------------------ the engine's call
    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        """One engine step: draft ids for every batch row (an empty list = no speculation for that row).

        sampled_token_ids:  [B] the tokens each row got at this step (empty: the row is not decoding)
        num_tokens_no_spec: [>=B] int, tokens of each row so far, the sampled ones included
        token_ids_cpu:      [>=B, max_model_len] int32, each row's tokens (prompt + output)
        """
        t0 = time.perf_counter()
        n_rows = len(sampled_token_ids)
        out: list[list[int]] = [[] for _ in range(n_rows)]
        if self._last_step is not None:   # the engine step just done: its time against what it verified
            self.step_cost.observe(self._last_step[1], t0 - self._last_step[0], self._last_step[2])
        self._last_step = None
        lost: list[_Request] = []
        try:
            lost = self._sync(n_rows, num_tokens_no_spec, token_ids_cpu)
            live: list[tuple[int, _Request, np.ndarray]] = []
            for row in range(n_rows):
                n = int(num_tokens_no_spec[row])
                if not len(sampled_token_ids[row]) or n == 0 or n >= self.max_model_len:
                    continue
                tokens = token_ids_cpu[row, :n]
                req = self._requests.get(row)
                if req is None:
                    req = self._adopt(lost, row, tokens)
                    if req is None:
                        req = self._begin(self.request_key(row, tokens), tokens)
                    self._requests[row] = req
                    self._requests_changed()
                self._learn(req, tokens)
                if self.pusher is not None and self.options.share_stats:
                    self._collect_run(req, tokens)
                if self.pusher is not None and self.options.share_outputs:
                    self._collect_output(req, tokens)
                req.seen, req.last = n, int(tokens[-1])
                live.append((row, req, tokens))
            self.stats.steps += 1
            self.stats.rows += len(live)
            if not live:
                return out
            room = [min(self.k, self.max_model_len - len(t) - 1) for _, _, t in live]
            if self.backend is not None:
                self._sessions_step(live)
            remote = self._datastore_trees(live)
            if self.backend is not None:
                self._reopen_lost(live)
            token_cost = self.step_cost.token_cost(len(live))
            chosen: list[tuple[int, _Request, int, DraftTree]] = []
            gain = 0.0
            for i, (row, req, tokens) in enumerate(live):
                if room[i] <= 0:
                    continue
                trees = [remote[i]] if remote is not None else []
                if self.use_context:
                    ctx = DecodeContext(tokens=tokens.astype(np.int64), prompt_len=0, request_id=hash(req.key))
                    trees.append(req.context.propose(ctx, _FUSE_BUDGET))
                trees = [t for t in trees if t.root == int(tokens[-1])]
                if not trees:
                    continue
                chain, expected = self.controller.choose_chain(fuse(trees, _FUSE_BUDGET), room[i], token_cost)
                if chain.num_drafts:
                    chosen.append((row, req, len(tokens), chain))
                    gain += expected - token_cost * chain.num_drafts
            # a speculative step costs the whole batch the engine's speculation overhead once: draft only
            # where the expected tokens pay for it too; but every _EXPLORE-th such step drafts anyway, so that
            # the overhead and the acceptance keep being measured (an over-estimate would otherwise stop
            # speculation for good)
            overhead = self.step_cost.overhead(len(live))
            if chosen and gain <= overhead:
                self._would_decline += 1
                if self._would_decline % _EXPLORE:
                    self.stats.extra["declined_steps"] = self.stats.extra.get("declined_steps", 0) + 1
                    chosen = []
            for row, req, at, chain in chosen:
                req.chain, req.chain_at = chain, at
                out[row] = chain.tokens[1:].tolist()
                self.stats.proposed_tokens += len(out[row])
            self._last_step = (t0, len(live) + sum(len(d) for d in out), bool(chosen))
            self.stats.extra["token_cost"] = token_cost
            self.stats.extra["overhead"] = overhead
            self.stats.extra["step_fit"] = self.step_cost.fit()
        except Exception as e:  # noqa: BLE001 - a drafting failure costs drafts, never the step
            self._error("propose", e)
            out = [[] for _ in range(n_rows)]
        finally:
            for req in lost:      # not seen again at any row: finished (or aborted)
                self._end(req)
            if lost:
                self._requests_changed()
        took = time.perf_counter() - t0
        self.stats.extra["last_propose_s"] = took
        if took > _SLOW_PROPOSE_S:
            # a stall of our own (a kernel compiling, a lost connection) is no engine step: learning the step
            # cost from it would make speculation look cheap for hundreds of steps
            self._last_step = None
            self.stats.extra["slow_proposes"] = self.stats.extra.get("slow_proposes", 0) + 1
        return out

    def _collect_run(self, req: _Request, tokens: np.ndarray) -> None:
        """Queue the request's tokens generated since its last run (with ORDER - 1 tokens of context) once
        there are 16; every 8 runs go to the pusher as one batch (its thread sends them)."""
        from .shared_stats import ORDER

        n = len(tokens)
        if req.pushed < 0:
            req.pushed = n              # the prompt is the user's: only generated tokens are shared
            return
        if n - req.pushed < 16:
            return
        start = max(0, req.pushed - (ORDER - 1))
        self._runs.append((tokens[start:n].tolist(), req.pushed - start))
        req.pushed = n
        if len(self._runs) >= 8:
            self.pusher.push([], self._runs)
            self._runs = []

    def _collect_output(self, req: _Request, tokens: np.ndarray) -> None:
        """Keep the request's tokens generated since its last step (the last MAX_OUTPUT of them)."""
        from .shared_stats import MAX_OUTPUT

        n = len(tokens)
        if req.output_at >= 0 and n > req.output_at:
            req.output.extend(tokens[req.output_at:n].tolist())
            if len(req.output) > 2 * MAX_OUTPUT:
                del req.output[:-MAX_OUTPUT]
        req.output_at = n

    def _datastore_trees(self, live: list) -> Optional[list[DraftTree]]:
        if self.backend is None:
            return None
        t0 = time.perf_counter()
        try:
            trees = self.backend.retrieve_many([t for _, _, t in live], _FUSE_BUDGET,
                                               [r.session_id for _, r, _ in live])
        except Exception as e:  # noqa: BLE001
            self._error("datastore lookup", e)
            trees = [DraftTree.empty(int(t[-1])) for _, _, t in live]
        self.stats.datastore_seconds += time.perf_counter() - t0
        return trees

    def _requests_changed(self) -> None:
        """A request started or ended: the live counts follow the table, and the stats file is rewritten."""
        self.stats.live_requests = len(self._requests)
        self.stats.max_live_requests = max(self.stats.max_live_requests, self.stats.live_requests)
        if not self.options.stats_file:
            return
        counters = getattr(self.backend, "stats", None)
        if counters:   # the datastore client's own counts: a dead or refusing service shows here, not in errors
            self.stats.extra["datastore"] = dict(counters)
        try:
            from ..datastore.durable import write_json

            write_json(self.options.stats_file, asdict(self.stats), unique=True)
        except Exception as e:  # noqa: BLE001 - observability never costs a step
            self._error("stats file", e)

    _last_log = 0.0

    def _error(self, what: str, e: BaseException) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._last_log > 10.0:   # rate-limited: one line per 10 s at most
            self._last_log = now
            log.warning("specstore proposer: %s failed (%d errors so far): %s: %s", what, self.stats.errors,
                        type(e).__name__, e)

    def close(self) -> None:
        for row in list(self._requests):
            self._end(self._requests.pop(row))
        self._requests_changed()
        if self.pusher is not None:
            if self._runs:
                self.pusher.push([], self._runs)
                self._runs = []
            self.pusher.close()
        if self.backend is not None:
            self.backend.close()
