"""Wire fuzzer of `datastore-serve` (issue 10, promise 3): raw request bytes against real server processes.

    python -m specstore.bench.wire_fuzz --inputs 100000 [--json wire_fuzz.json] [--index PATH] [--seed 0]

Two real `datastore-serve` processes on 127.0.0.1 serve one token index (built here by index-build's code,
or ``--index``; vocabulary 1000 unless the index says otherwise): one with a bearer token (reads open,
writes need the token) and one with the token and ``--auth-reads``. Each input is raw bytes sent to one
method (every unary method, RetrieveStream with 1-3 messages, and a method the service lacks), with no
token, the right token or a wrong one. Input classes:

A unary method of the service this fuzzer has no generator for (PushStats, PullStats) gets the byte-level
classes only; whether it needs the token is the servicer's ``WRITE_METHODS``.

* ``valid``: well-formed requests within every limit (Retrieve's trees are compared with the in-process
  lookup, token for token);
* ``mutated``: a valid message with 1-4 mutations: bit flips, byte overwrites, truncation, a duplicated or
  deleted slice, a splice with another message, random bytes inserted, an overlong (11-byte) varint;
* ``truncated``: a valid message cut short; ``malformed``: random bytes; ``generated``: random
  tag / wire-type / value records (unknown fields, wrong wire types, lengths past the end, varint overflows);
* ``out_of_vocab``, ``negative``, ``empty``, ``huge_budget`` (budgets, options, hints and batches past the
  limits, 1-4 MB contexts), ``long_ids`` (100 KB session ids, 20 KB fingerprints): well-formed but wrong;
* ``oversized``: a request over the server's 8 MiB receive limit (a few per run: each costs 8 MiB).

Per input: the call ends within ``--deadline`` (else a hang), its status is one of those expected for its
class, method and token (never UNKNOWN or INTERNAL: a violation), and the server process is still running.
An OK Retrieve answer is checked against the request's caps (at most ``budget`` nodes, parents before
children, ids in the vocabulary). The servers' RSS is sampled every 0.25 s (start after warm-up, peak,
end); at the end each server must answer a valid lookup with the in-process tree, stop on SIGTERM with
status 0, and have logged no traceback. Prints a summary (``--json``: also written there); exit status 1
on any violation, hang or crash.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import grpc
import numpy as np

from ..datastore.servicer import WRITE_METHODS
from ..protos import datastore_pb2 as pb
from .serve_process import ServeProcess

SERVICE = "/specstore.datastore.v1.Datastore/"
UNARY = ("Info", "OpenSession", "CloseSession", "Retrieve", "RetrieveBatch")
_METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Datastore"].methods}
# unary methods of the service this fuzzer has no generator for (PushStats, PullStats): byte-level inputs only
OTHER = tuple(n for n, m in _METHODS.items() if n not in UNARY + ("RetrieveStream",)
              and not m.client_streaming and not m.server_streaming)
WRITES = tuple(sorted(WRITE_METHODS))     # the methods that need the token (the servicer's list)
UNKNOWN_NAMES = [n for n in ("Push", "Nope", "retrieve", "") if n not in _METHODS]
TOKEN = "fuzz-token-7c1e"
RECEIVE_LIMIT = 8 << 20          # the server's grpc.max_receive_message_length (datastore/server.py)
LIMITS = dict(max_context=1024, max_budget=256, max_batch=64, max_hint=1024, option=1024, cells=65_536)
OK, INV, PRE, UNAUTH, EXH, UNIMPL = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAUTHENTICATED",
                                     "RESOURCE_EXHAUSTED", "UNIMPLEMENTED")
CLASSES = ("valid", "mutated", "truncated", "malformed", "generated", "out_of_vocab", "negative", "empty",
           "huge_budget", "long_ids", "oversized", "unknown_method")
# how often each class is drawn (oversized is added a few times per run, apart from these weights)
WEIGHTS = {"valid": 10, "mutated": 30, "truncated": 8, "malformed": 8, "generated": 10, "out_of_vocab": 6,
           "negative": 6, "empty": 4, "huge_budget": 6, "long_ids": 3, "unknown_method": 1}


@dataclass
class Case:
    """One input: ``payloads`` (one message for a unary method; 1-3 for RetrieveStream) sent to ``method``
    with ``auth`` ("none", "right", "wrong"); ``want`` the acceptable codes once the token is accepted;
    ``check(answers)`` an optional check of an OK call's answers (bytes, one per payload): None or what is
    wrong."""
    cls: str
    method: str
    payloads: list
    auth: str = "right"
    want: frozenset = frozenset()
    check: Optional[Callable[[list], Optional[str]]] = None


@dataclass
class Served:
    """One corpus-derived index and what the generator needs of it."""
    path: Path
    vocab: int
    fingerprint: str
    corpus: np.ndarray        # int32 [n] the index's tokens, documents concatenated
    index: object             # DatastoreIndex, opened in this process (the reference lookup)


# ------------------------------------------------------------------------------------------ protobuf bytes
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _record(rng: random.Random) -> bytes:
    """One random protobuf record: a tag of a known or unknown field number with any wire type, and a value
    that may be cut, overlong, or claim a length past the end."""
    fieldno = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(1, 1 << 29)])
    wt = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])
    tag = _varint(fieldno << 3 | wt)
    if wt == 0:
        v = rng.choice([_varint(rng.getrandbits(rng.choice([7, 32, 64]))), b"\xff" * rng.randrange(10, 16) + b"\x01",
                        b"\x80" * 10, b"\xff" * 9 + b"\x7f"])
    elif wt == 1:
        v = rng.randbytes(rng.choice([8, 8, 3]))
    elif wt == 5:
        v = rng.randbytes(rng.choice([4, 4, 2]))
    elif wt == 2:
        body = rng.randbytes(rng.randrange(0, 40))
        claimed = rng.choice([len(body), len(body), len(body) + rng.randrange(1, 1000), (1 << 32) + 5, 1 << 62])
        v = _varint(claimed) + body
    else:
        v = b""          # group start / end, or invalid wire types 6 and 7
    return tag + v


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """``data`` with 1-4 random mutations (``other``: a second message, for splices)."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(8)
        if op == 0 and b:                                        # bit flips
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                      # byte overwrites (interesting values)
            b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2 and b:                                      # truncation
            del b[rng.randrange(len(b)):]
        elif op == 3 and b:                                      # a duplicated slice
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randrange(1, 64))
            b[j:j] = b[i:j] * rng.randrange(1, 4)
        elif op == 4 and b:                                      # a deleted slice
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 16)]
        elif op == 5:                                            # a splice with another message
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif op == 6:                                            # random bytes inserted
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        else:                                                    # an overlong varint or a random record
            i = rng.randrange(len(b) + 1)
            b[i:i] = _record(rng) if rng.random() < 0.5 else bytes([0x08]) + b"\xff" * 10 + b"\x01"
    return bytes(b)


# ------------------------------------------------------------------------------------------ the generator
class Generator:
    """Inputs of every class, drawn from ``rng``; valid requests take their contexts from the corpus."""

    def __init__(self, rng: random.Random, s: Served):
        self.rng, self.s = rng, s
        self.classes = list(WEIGHTS)
        self.weights = [WEIGHTS[c] for c in self.classes]

    # --- valid requests
    def context(self) -> list:
        n = self.rng.randrange(1, 24)
        i = self.rng.randrange(0, len(self.s.corpus) - n)
        return self.s.corpus[i:i + n].tolist()

    def options(self) -> Optional[pb.RetrieveOptions]:
        if self.rng.random() < 0.5:
            return None
        r = self.rng
        return pb.RetrieveOptions(max_span=r.choice([0, 4, 16, 64]), min_span=r.choice([0, 1, 2]),
                                  max_matches=r.choice([0, 8, 64, 256]), depth=r.choice([0, 4, 8, 32]),
                                  min_prob=r.choice([0.0, 1e-3, 0.05, 0.5]))

    def retrieve(self) -> pb.RetrieveRequest:
        r = self.rng
        req = pb.RetrieveRequest(context=self.context(), budget=r.randrange(1, 65),
                                 tokenizer_fingerprint=r.choice(["", self.s.fingerprint]), seq=r.getrandbits(32))
        o = self.options()
        if o is not None:
            req.options.CopyFrom(o)
        if r.random() < 0.2:
            n = r.randrange(1, 8)
            req.hint_tokens.extend(r.randrange(self.s.vocab) for _ in range(n))
            req.hint_probs.extend(r.random() / n for _ in range(n))
        return req

    def valid(self, method: str) -> bytes:
        r = self.rng
        if method in OTHER:
            return b""
        if method == "Info":
            return pb.InfoRequest().SerializeToString()
        if method == "OpenSession":
            return pb.OpenSessionRequest(prompt_ids=self.context(), memory=True, skip_documents=True).SerializeToString()
        if method == "CloseSession":
            return pb.CloseSessionRequest(session_id=f"{r.getrandbits(128):032x}").SerializeToString()
        if method == "RetrieveBatch":
            return pb.RetrieveBatchRequest(requests=[self.retrieve() for _ in range(r.randrange(0, 6))]).SerializeToString()
        return self.retrieve().SerializeToString()

    def check_trees(self, payloads: list, compare: bool) -> Callable[[list], Optional[str]]:
        """A check of the answers to RetrieveRequest ``payloads`` (bytes): one per request, each within its
        request's caps, and with ``compare`` equal to the in-process lookup."""
        reqs = []
        for data in payloads:
            try:
                reqs.append(pb.RetrieveRequest.FromString(data))
            except Exception:  # noqa: BLE001 - the server must not have answered OK then
                reqs.append(None)

        def check(answers: list) -> Optional[str]:
            if len(answers) != len(reqs):
                return f"{len(answers)} answers to {len(reqs)} requests"
            if any(q is None for q in reqs):
                return "answered OK to bytes that do not parse"
            for q, a in zip(reqs, answers):
                if (err := self.check_tree(q, a, compare)) is not None:
                    return err
            return None
        return check

    def check_tree(self, req: pb.RetrieveRequest, data: bytes, compare: bool) -> Optional[str]:
        """None when the answer ``data`` to ``req`` is within its caps (and with ``compare`` equal to the
        in-process lookup), else what is wrong."""
        r = pb.RetrieveResponse.FromString(data)
        k = len(r.tokens)
        if k > req.budget or not len(r.parents) == len(r.probs) == len(r.sources) == k:
            return f"tree of {k} nodes for budget {req.budget}"
        if any(not -1 <= p < i for i, p in enumerate(r.parents)) or any(not 0 <= t < self.s.vocab for t in r.tokens):
            return "parents or tokens out of range"
        if compare:
            o = req.options
            kw = {n: getattr(o, n) for n in ("max_span", "min_span", "max_matches", "depth", "min_prob")
                  if getattr(o, n)}
            if req.hint_tokens:
                kw.update(hint_tokens=np.asarray(req.hint_tokens, np.int32),
                          hint_probs=np.asarray(req.hint_probs, np.float32))
            want = self.s.index.retrieve(np.asarray(req.context, np.int32), req.budget, **kw)
            if list(r.tokens) != want.tokens.tolist() or list(r.parents) != want.parents.tolist():
                return "tree differs from the in-process lookup"
        return None

    # --- well-formed but wrong requests (method, message bytes): always refused with INVALID_ARGUMENT
    def wrong(self, cls: str) -> tuple:
        r, V = self.rng, self.s.vocab
        req = self.retrieve()
        if cls == "out_of_vocab":
            where = r.randrange(3)
            if where == 2:
                return "OpenSession", pb.OpenSessionRequest(prompt_ids=[1, V + r.randrange(1 << 20)], memory=True,
                                                            skip_documents=True).SerializeToString()
            bad = r.choice([V, V + 1, 2 ** 31 - 1, V + r.randrange(1 << 30)])
            if where == 0:
                req.context.insert(r.randrange(len(req.context) + 1), bad)
            else:
                del req.hint_tokens[:]
                del req.hint_probs[:]
                req.hint_tokens.extend([1, bad])
                req.hint_probs.extend([0.5, 0.5])
        elif cls == "negative":
            where = r.randrange(4)
            if where == 3:
                return "OpenSession", pb.OpenSessionRequest(prompt_ids=[1, -r.randrange(1, 1 << 31)], memory=True,
                                                            skip_documents=True).SerializeToString()
            if where == 0:
                req.context.insert(r.randrange(len(req.context) + 1), -r.randrange(1, 1 << 31))
            elif where == 1:
                del req.hint_tokens[:]
                del req.hint_probs[:]
                req.hint_tokens.extend([1, -1])
                req.hint_probs.extend([0.5, 0.5])
            else:
                del req.hint_tokens[:]
                del req.hint_probs[:]
                req.hint_tokens.extend([1, 2])
                req.hint_probs.extend([0.5, r.choice([-0.5, -1e-30, float("-inf"), float("nan"), 1.5])])
        elif cls == "empty":
            return r.choice([("Retrieve", b""), ("OpenSession", b""), ("CloseSession", b""),
                             ("Retrieve", pb.RetrieveRequest(budget=4).SerializeToString()),
                             ("Retrieve", pb.RetrieveRequest(context=[1, 2]).SerializeToString()),
                             ("RetrieveBatch", pb.RetrieveBatchRequest(requests=[pb.RetrieveRequest()]).SerializeToString()),
                             ("OpenSession", pb.OpenSessionRequest(memory=True).SerializeToString())])
        elif cls == "huge_budget":
            L = LIMITS
            what = r.randrange(7)
            if what == 0:
                req.budget = r.choice([L["max_budget"] + 1, 2 ** 32 - 1, r.randrange(L["max_budget"] + 1, 2 ** 32)])
            elif what == 1:
                setattr(req.options, r.choice(["max_span", "min_span", "max_matches", "depth"]),
                        r.choice([L["option"] + 1, 2 ** 32 - 1]))
            elif what == 2:
                req.options.max_matches, req.options.depth = L["option"], L["option"]   # 1M cells > 65,536
            elif what == 3:
                n = L["max_hint"] + 1 + r.randrange(2000)
                del req.hint_tokens[:]
                del req.hint_probs[:]
                req.hint_tokens.extend([1] * n)
                req.hint_probs.extend([1.0 / n] * n)
            elif what == 4:
                return "RetrieveBatch", pb.RetrieveBatchRequest(
                    requests=[req] * (L["max_batch"] + 1 + r.randrange(100))).SerializeToString()
            elif what == 5:   # a context of 1-4 MB (under the receive limit): refused for its length
                n = r.randrange(250_000, 1_000_000)
                return "Retrieve", pb.RetrieveRequest(context=np.ones(n, np.int32).tolist(), budget=8).SerializeToString()
            else:
                req.options.min_prob = r.choice([1.5, float("inf"), float("nan")])
        elif cls == "long_ids":
            what = r.randrange(4)
            if what == 0:
                req.session_id = "s" * r.choice([129, 100_000])
            elif what == 1:
                return "CloseSession", pb.CloseSessionRequest(session_id="s" * 100_000).SerializeToString()
            elif what == 2:
                req.tokenizer_fingerprint = "f" * 20_000
            else:
                return "OpenSession", pb.OpenSessionRequest(prompt_text="q", memory=True, skip_documents=True,
                                                            tokenizer_fingerprint="f" * 20_000).SerializeToString()
        if r.random() < 0.2:
            return "RetrieveBatch", pb.RetrieveBatchRequest(requests=[self.retrieve(), req]).SerializeToString()
        return r.choice(["Retrieve", "RetrieveStream"]), req.SerializeToString()

    # --- one input
    def case(self) -> Case:
        r = self.rng
        cls = r.choices(self.classes, self.weights)[0]
        auth = r.choice(["right", "right", "none", "wrong"])
        method = r.choice(UNARY + ("RetrieveStream",) + OTHER)
        if cls == "unknown_method":
            return Case(cls, r.choice(UNKNOWN_NAMES), [self.valid("Retrieve")], auth, frozenset({UNIMPL}))
        if method in OTHER and cls not in ("mutated", "truncated", "malformed", "generated"):
            cls = r.choice(["mutated", "truncated", "malformed", "generated"])
        if cls in ("out_of_vocab", "negative", "empty", "huge_budget", "long_ids"):
            method, data = self.wrong(cls)
            return Case(cls, method, [data], auth, frozenset({INV, PRE} if cls == "long_ids" else {INV}))
        if cls == "valid":
            data = self.valid(method)
            payloads = [data]
            if method == "RetrieveStream":
                payloads = [self.retrieve().SerializeToString() for _ in range(r.randrange(1, 4))]
            check = self.check_trees(payloads, compare=True) if method.startswith("Retrieve") and \
                method != "RetrieveBatch" else None
            return Case(cls, method, payloads, auth, frozenset({OK}), check)
        # byte-level classes: anything decodable may be answered (or refused for its content)
        seed_method = "Retrieve" if method == "RetrieveStream" else method
        if cls == "mutated":
            data = mutate(r, self.valid(seed_method), self.valid(r.choice(UNARY)))
        elif cls == "truncated":
            v = self.valid(seed_method)
            data = v[:r.randrange(len(v))] if v else b"\x0a"
        elif cls == "malformed":
            data = r.randbytes(r.choice([1, 2, 5, r.randrange(1, 300)]))
        else:
            data = b"".join(_record(r) for _ in range(r.randrange(1, 8)))
        payloads = [data]
        if method == "RetrieveStream" and r.random() < 0.5:    # the bad message after a good one
            payloads = [self.valid("Retrieve"), data]
        check = self.check_trees(payloads, compare=False) if method in ("Retrieve", "RetrieveStream") else None
        return Case(cls, method, payloads, auth, frozenset({OK, INV, PRE}), check)

    def oversized(self, method: str) -> Case:
        n = RECEIVE_LIMIT // 4 + 1000        # > 8 MiB of packed 4-byte varints
        data = pb.RetrieveRequest(context=[1 << 21] * n, budget=8).SerializeToString()
        assert len(data) > RECEIVE_LIMIT
        return Case("oversized", method, [data], self.rng.choice(["right", "none"]), frozenset({EXH}))


def expected(case: Case, auth_reads: bool) -> frozenset:
    """The acceptable codes of ``case`` on a server with a token (and ``auth_reads``)."""
    if case.cls in ("oversized", "unknown_method"):
        return case.want           # refused by gRPC itself, before any handler
    needs_token = auth_reads or case.method in WRITES
    if needs_token and case.auth != "right":
        return frozenset({UNAUTH})
    return case.want


# ------------------------------------------------------------------------------------------ servers
class Server(ServeProcess):
    """A real ``datastore-serve`` process on 127.0.0.1:0 with the token (from a file), its log kept."""

    def __init__(self, index: Path, work: Path, name: str, auth_reads: bool):
        self.name, self.auth_reads = name, auth_reads
        token_file = work / "token"
        token_file.write_text(TOKEN)
        super().__init__(index, "--auth-token-file", str(token_file), "--no-faiss",
                         *(["--auth-reads"] if auth_reads else []), log_path=work / f"{name}.log")


def _md(auth: str):
    return {"right": (("authorization", f"Bearer {TOKEN}"),), "wrong": (("authorization", "Bearer nope"),),
            "none": ()}[auth]


class RssSampler(threading.Thread):
    """Samples each server's RSS every ``interval_s``: start (the first sample), peak, end."""

    def __init__(self, servers: list, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.servers, self.interval_s = servers, interval_s
        self.samples: dict = {s.name: [] for s in servers}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for s in self.servers:
                v = s.rss_bytes()
                if v is not None:
                    self.samples[s.name].append(v)
            self._halt.wait(self.interval_s)

    def stop(self) -> dict:
        self._halt.set()
        self.join(5)
        mib = 1 << 20
        # the timeline (12 evenly spaced samples) tells growth that levels off from a leak
        return {name: {"start_mib": round(v[0] / mib, 1), "peak_mib": round(max(v) / mib, 1),
                       "end_mib": round(v[-1] / mib, 1), "samples": len(v),
                       "timeline_mib": [round(v[i * (len(v) - 1) // 11] / mib) for i in range(12)]}
                for name, v in self.samples.items() if v}


# ------------------------------------------------------------------------------------------ the campaign
@dataclass
class Tally:
    by_class: dict = field(default_factory=lambda: defaultdict(Counter))     # class -> code -> count
    by_method: dict = field(default_factory=lambda: defaultdict(Counter))    # method -> code -> count
    violations: int = 0
    hangs: int = 0
    bad_answers: int = 0
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, case: Case, server: str, code: str, want: frozenset, details: str, problem: Optional[str]):
        with self.lock:
            self.by_class[case.cls][code] += 1
            self.by_method[case.method or "(empty)"][code] += 1
            hang = code == "DEADLINE_EXCEEDED"
            self.hangs += hang
            self.violations += code not in want and not hang
            self.bad_answers += problem is not None
            if (code not in want or problem) and len(self.examples) < 30:
                self.examples.append({"server": server, "class": case.cls, "method": case.method, "auth": case.auth,
                                      "want": sorted(want), "got": code, "details": details[:300],
                                      "problem": problem, "bytes": case.payloads[-1][:48].hex(),
                                      "size": len(case.payloads[-1])})


def send(ch: grpc.Channel, case: Case, deadline_s: float) -> tuple:
    """(code name, details, problem with an OK answer or None) of one input."""
    md = _md(case.auth)
    try:
        if case.method == "RetrieveStream":
            out = list(ch.stream_stream(SERVICE + case.method)(iter(case.payloads), timeout=deadline_s, metadata=md))
        else:
            out = [ch.unary_unary(SERVICE + case.method)(case.payloads[0], timeout=deadline_s, metadata=md)]
        if len(out) != len(case.payloads):
            return OK, "", f"{len(out)} answers to {len(case.payloads)} requests"
        return OK, "", case.check(out) if case.check else None
    except grpc.RpcError as e:
        code = e.code()
        return (code.name if code is not None else "NONE"), e.details() or "", None


def run_worker(server: Server, cases: int, seed: int, s: Served, tally: Tally, deadline_s: float,
               oversized: int, dead: threading.Event) -> None:
    gen = Generator(random.Random(seed), s)
    special = set(random.Random(seed + 1).sample(range(cases), min(oversized, cases)))
    with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                         ("grpc.max_send_message_length", 64 << 20)]) as ch:
        for i in range(cases):
            if dead.is_set():
                return
            case = gen.oversized(gen.rng.choice(["Retrieve", "RetrieveBatch", "OpenSession"])) \
                if i in special else gen.case()
            want = expected(case, server.auth_reads)
            code, details, problem = send(ch, case, deadline_s)
            tally.add(case, server.name, code, want, details, problem)
            if i % 200 == 0 and server.proc.poll() is not None:
                dead.set()


def build_fuzz_index(folder: Path, vocab: int = 1000, seed: int = 0) -> Path:
    """A token index of ~100k tokens whose documents repeat 200 short phrases (lookups match and branch)."""
    from ..indexers.build import BuildOptions, build_index

    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, rng.integers(3, 12)) for _ in range(200)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 200, 60)]) for _ in range(220)]
    out = folder / "index"
    build_index(None, out, BuildOptions(progress=False), token_docs=docs, vocab_size=vocab, log=lambda *_: None)
    return out


def open_served(path: Path) -> Served:
    from ..datastore.index import DatastoreIndex

    ix = DatastoreIndex.open(path)
    corpus = np.concatenate([np.asarray(sh.tokens[:min(len(sh.tokens), 1 << 20)]) for sh in ix.shards])
    corpus = corpus[(corpus >= 0) & (corpus < ix.vocab_size)].astype(np.int32)
    return Served(path, int(ix.vocab_size), str(ix.tokenizer_fingerprint), corpus, ix)


def final_check(server: Server, s: Served) -> Optional[str]:
    """None when ``server`` still answers a valid lookup with the in-process tree, else what is wrong."""
    if server.proc.poll() is not None:
        return f"exited with {server.proc.returncode}"
    for i in range(0, len(s.corpus) - 6, 101):      # a context that drafts
        ctx = s.corpus[i:i + 6]
        want = s.index.retrieve(ctx, 32)
        if len(want.tokens):
            break
    with grpc.insecure_channel(server.address) as ch:
        data = ch.unary_unary(SERVICE + "Retrieve")(pb.RetrieveRequest(context=ctx.tolist(), budget=32)
                                                    .SerializeToString(), timeout=30, metadata=_md("right"))
    r = pb.RetrieveResponse.FromString(data)
    if not len(want.tokens) or list(r.tokens) != want.tokens.tolist() or list(r.parents) != want.parents.tolist():
        return "the final lookup differs from the in-process one"
    return None


def run_fuzz(inputs: int, work: Path, index: Optional[Path] = None, seed: int = 0, deadline_s: float = 10.0,
             workers_per_server: int = 2, oversized: int = 2, log=print) -> dict:
    """The campaign: ``inputs`` inputs over two servers (token; token + --auth-reads). Returns the summary
    (``ok``: no violation, hang, bad answer or crash, and every final check passed)."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = index or build_fuzz_index(work)
    s = open_served(path)
    servers = [Server(path, work, "token", auth_reads=False), Server(path, work, "auth-reads", auth_reads=True)]
    tally, dead = Tally(), threading.Event()
    try:
        sampler = RssSampler(servers)
        sampler.start()
        n_workers = len(servers) * workers_per_server
        per = [inputs // n_workers + (k < inputs % n_workers) for k in range(n_workers)]
        threads = [threading.Thread(target=run_worker, args=(servers[k % len(servers)], per[k], seed * 1000 + k, s,
                                                             tally, deadline_s, oversized, dead))
                   for k in range(n_workers)]
        t1 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fuzz_s = time.time() - t1
        finals = {sv.name: final_check(sv, s) for sv in servers}
        rss = sampler.stop()
    finally:
        codes = {sv.name: sv.stop() for sv in servers}
        s.index.close()
    logs = {}
    for sv in servers:
        text = sv.log_path.read_text()
        logs[sv.name] = {"bytes": len(text), "lines": text.count("\n"), "tracebacks": text.count("Traceback"),
                         "undecodable_lines": text.count("undecodable request")}
    tried = sum(sum(c.values()) for c in tally.by_class.values())
    crashes = sum(1 for sv in servers if sv.proc.returncode not in (0,)) + dead.is_set()
    summary = {
        "inputs": tried, "seconds": round(time.time() - t0, 1), "fuzz_seconds": round(fuzz_s, 1),
        "inputs_per_s": round(tried / max(fuzz_s, 1e-9)),
        "by_class": {c: dict(tally.by_class[c]) for c in CLASSES if c in tally.by_class},
        "by_method": {m: dict(v) for m, v in sorted(tally.by_method.items())},
        "codes": dict(sum(tally.by_class.values(), Counter())),
        "violations": tally.violations, "hangs": tally.hangs, "bad_answers": tally.bad_answers,
        "crashes": crashes, "exit_codes": codes, "final_checks": finals, "rss": rss, "logs": logs,
        "examples": tally.examples,
    }
    summary["ok"] = (tally.violations == 0 and tally.hangs == 0 and tally.bad_answers == 0 and crashes == 0
                     and tried == inputs and all(v is None for v in finals.values())
                     and all(v["tracebacks"] == 0 for v in logs.values()))
    log(f"wire_fuzz: {tried} inputs in {fuzz_s:.1f} s; violations {tally.violations}, hangs {tally.hangs}, "
        f"bad answers {tally.bad_answers}, crashes {crashes}; RSS {rss}")
    return summary


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.wire_fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--index", type=Path, default=None, help="serve this index (default: build a token index)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds before a call counts as a hang")
    ap.add_argument("--workers-per-server", type=int, default=2)
    ap.add_argument("--oversized", type=int, default=4, help="inputs over the 8 MiB receive limit, per worker")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wire-fuzz-") as tmp:
        summary = run_fuzz(a.inputs, a.work or Path(tmp), a.index, a.seed, a.deadline, a.workers_per_server,
                           a.oversized)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
