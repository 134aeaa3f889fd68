"""Issue 10, promise 6 (security), the full run: a real `datastore-serve --auth-token T --auth-reads` at
its most verbose log level, probed from outside as an attacker would, with counts of what got through.

    python -m specstore.bench.security_probe --bearers 20000 --ids 20000 --garbage 20000 --json out.json

1. ``--bearers`` random authorization values (mutations of the right one: a character deleted, inserted,
   replaced or case-flipped, truncations, extensions, other schemes, random printable strings), each on a
   random RPC of the Datastore service: every one must be UNAUTHENTICATED.
2. ``--ids`` probes of session ids derived from real ones ('../', absolute paths, NUL bytes at random
   places, truncations, replaced characters, case, another id appended): Retrieve must find no session
   (INVALID_ARGUMENT) and CloseSession close none; afterwards every real session still answers from its own
   memory.
3. ``--garbage`` random byte strings (with the token) to random methods of the Datastore and Health
   services: never UNKNOWN or INTERNAL; the server stays up. (Bytes that happen to decode get an answer:
   OK, another code, or for Health/Watch a watch that runs into its 1 s deadline.)
4. The per-client session cap: OpenSession until RESOURCE_EXHAUSTED; the count must equal the cap.
5. The token compare's time (in process): guesses that share nothing with the token against guesses that
   share all but its last character, interleaved; the medians must not differ beyond noise.
Then the server's log must hold neither the token, nor the prompt's token ids, nor a session id, nor a
traceback, and stay small (one line a minute for undecodable bytes).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from ..datastore.auth import bearer_matches
from ..protos import datastore_pb2 as pb
from ..protos import datastore_pb2_grpc as pb_grpc
from .serve_process import ServeProcess

TOKEN = "probe-Tk-7f3e9a01c4"
CTX = [41_307, 58_219, 73_041, 86_593, 97_155]
SERVICE = pb.DESCRIPTOR.services_by_name["Datastore"]
HEALTH = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


def build_index(folder: Path) -> Path:
    from ..indexers.build import BuildOptions, build_index as build

    rng = np.random.default_rng(0)
    docs = [np.concatenate([rng.integers(10, 1000, 2000), CTX, [12, 13, 14]]) for _ in range(8)]
    out = folder / "index"
    build(None, out, BuildOptions(progress=False), token_docs=docs, vocab_size=100_000, log=lambda *_: None)
    return out


def start(index: Path, log_path: Path, cap: int) -> ServeProcess:
    return ServeProcess(index, "--auth-token", TOKEN, "--auth-reads", "--log-level", "debug", "--no-faiss",
                        "--max-sessions-per-client", str(cap), log_path=log_path)


def _code(fn):
    """The call's status code, or "CLIENT_REFUSED" when gRPC would not send it (metadata it deems illegal)."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    except ValueError:
        return "CLIENT_REFUSED"
    return grpc.StatusCode.OK


def _call(ch, path: str, streaming_in: bool, streaming_out: bool, data: bytes, md) -> grpc.StatusCode:
    if streaming_in:
        return _code(lambda: list(ch.stream_stream(path)(iter([data]), timeout=10, metadata=md)))
    if streaming_out:   # Health/Watch: bytes that happen to decode open a watch, which streams until the deadline
        return _code(lambda: list(ch.unary_stream(path)(data, timeout=1, metadata=md)))
    return _code(lambda: ch.unary_unary(path)(data, timeout=10, metadata=md))


def bad_bearer(rng: random.Random) -> str:
    right = f"Bearer {TOKEN}"
    kind = rng.randrange(8)
    i = rng.randrange(len(right))
    if kind == 0:
        v = right[:i] + right[i + 1:]
    elif kind == 1:
        v = right[:i] + rng.choice(PRINTABLE) + right[i:]
    elif kind == 2:
        v = right[:i] + rng.choice(PRINTABLE.replace(right[i], "")) + right[i + 1:]
    elif kind == 3:
        v = right[:i] + right[i].swapcase() + right[i + 1:]
    elif kind == 4:
        v = right[:i]
    elif kind == 5:
        v = right + "".join(rng.choices(PRINTABLE, k=rng.randint(1, 50)))
    elif kind == 6:
        v = rng.choice(["Basic ", "Token ", "bearer ", "BEARER ", "", "Bearer  "]) + TOKEN
    else:
        v = "".join(rng.choices(PRINTABLE, k=rng.randint(0, 300)))
    return v if v != right else v + "x"


def bad_id(rng: random.Random, real: list[str]) -> str:
    sid = rng.choice(real)
    kind = rng.randrange(9)
    i = rng.randrange(len(sid) + 1)
    return [lambda: "../" + sid, lambda: f"/tmp/{sid}", lambda: sid[:i] + "\x00" + sid[i:],
            lambda: sid[:max(0, i - 1)], lambda: sid[:i] + rng.choice("0123456789abcdef/.") + sid[i + 1:],
            lambda: sid.upper(), lambda: sid + rng.choice(real), lambda: "../" * rng.randint(1, 5) + sid,
            lambda: sid + "/.." * rng.randint(1, 3)][kind]()


def compare_timing(n: int) -> dict:
    """Median ns of bearer_matches for guesses sharing nothing vs all but the last character, interleaved."""
    far, near = f"Bearer {'z' * len(TOKEN)}", f"Bearer {TOKEN[:-1]}z"
    t_far, t_near = [], []
    clock = time.perf_counter_ns
    for _ in range(n):
        for value, out in ((far, t_far), (near, t_near)):
            t0 = clock()
            bearer_matches(value, TOKEN)
            out.append(clock() - t0)
    return {"calls_each": n, "median_ns_nothing_shared": float(np.median(t_far)),
            "median_ns_all_but_last_shared": float(np.median(t_near))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.bench.security_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bearers", type=int, default=2000)
    ap.add_argument("--ids", type=int, default=2000)
    ap.add_argument("--garbage", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=16, help="real sessions the id probes derive from")
    ap.add_argument("--cap", type=int, default=64, help="--max-sessions-per-client of the server")
    ap.add_argument("--timing-calls", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (index, server log)")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="security-probe-"))
    t0 = time.time()
    index = build_index(work)
    server = start(index, work / "serve.log", a.cap)
    proc, address = server.proc, server.address
    auth = (("authorization", f"Bearer {TOKEN}"),)
    methods = [(f"/{SERVICE.full_name}/{m.name}", m.client_streaming, m.server_streaming) for m in SERVICE.methods]
    out: dict = {"address": address}
    try:
        with grpc.insecure_channel(address) as ch:
            st = pb_grpc.DatastoreStub(ch)
            # 1. bearer values
            got = {}
            for _ in range(a.bearers):
                path, cin, cout = rng.choice(methods)
                code = _call(ch, path, cin, cout, b"", (("authorization", bad_bearer(rng)),))
                name = getattr(code, "name", code)
                got[name] = got.get(name, 0) + 1
            out["bearers"] = {"tried": a.bearers, "codes": got,
                              "admitted": a.bearers - got.get("UNAUTHENTICATED", 0) - got.get("CLIENT_REFUSED", 0)}
            # 2. session ids
            # session i's memory: a, b, i + 20, a, b (the corpus continues a, b with CTX[2])
            real = [st.OpenSession(pb.OpenSessionRequest(prompt_ids=[*CTX[:2], i + 20, *CTX[:2]], memory=True,
                                                         skip_documents=True), timeout=10, metadata=auth).session_id
                    for i in range(a.sessions)]
            found = closed = sent = 0
            for _ in range(a.ids):
                sid = bad_id(rng, real)
                if not sid or sid in real:   # an empty id asks for no session
                    continue
                sent += 1
                c = _code(lambda: st.Retrieve(pb.RetrieveRequest(context=CTX[-2:], budget=4, session_id=sid),
                                              timeout=10, metadata=auth))
                found += c != grpc.StatusCode.INVALID_ARGUMENT
                try:
                    closed += st.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=auth).closed
                except grpc.RpcError as e:
                    closed += e.code() != grpc.StatusCode.INVALID_ARGUMENT
            intact = 0
            for i, sid in enumerate(real):   # each session drafts its own token (i + 20) from its memory
                r = st.Retrieve(pb.RetrieveRequest(context=CTX[:2], budget=8, session_id=sid), timeout=10,
                                metadata=auth)
                intact += (i + 20) in r.tokens
            out["session_ids"] = {"drawn": a.ids, "sent": sent, "found_a_session": found, "closed_a_session": closed,
                                  "real_sessions": a.sessions, "real_sessions_intact": intact}
            # 3. garbage bytes
            got = {}
            targets = methods + [(p, False, p.endswith("Watch")) for p in HEALTH]
            for _ in range(a.garbage):
                path, cin, cout = rng.choice(targets)
                data = bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 3, 10, 100, 1000))))
                code = _call(ch, path, cin, cout, data, auth)
                name = getattr(code, "name", code)
                got[name] = got.get(name, 0) + 1
            out["garbage"] = {"tried": a.garbage, "codes": got,
                              "unknown_or_internal": got.get("UNKNOWN", 0) + got.get("INTERNAL", 0)}
            # 4. the per-client cap
            opened = 0
            while opened <= a.cap:
                one = pb.OpenSessionRequest(prompt_ids=[1], memory=True, skip_documents=True)
                c = _code(lambda: st.OpenSession(one, timeout=10, metadata=auth))
                if c != grpc.StatusCode.OK:
                    break
                opened += 1
            out["session_cap"] = {"cap": a.cap, "held_before": a.sessions, "opened_more": opened,
                                  "refused_with": c.name, "held": a.sessions + opened}
            out["server_alive"] = proc.poll() is None
    finally:
        server.stop(60)
    # 5. the compare's time
    out["compare_timing"] = compare_timing(a.timing_calls)
    log = (work / "serve.log").read_text()
    ids = [str(t) for t in CTX]
    leaks = {"token": TOKEN in log, "context ids": bool(re.search("|".join(rf"{x}\D{{1,3}}{y}" for x, y in
                                                                      zip(ids, ids[1:])), log)),
             "session ids": sum(sid in log for sid in real), "tracebacks": log.count("Traceback")}
    out["log"] = {"bytes": len(log), "lines": len(log.splitlines()), "leaks": leaks}
    out["seconds"] = round(time.time() - t0, 1)
    ok = (out["bearers"]["admitted"] == 0 and out["session_ids"]["found_a_session"] == 0
          and out["session_ids"]["closed_a_session"] == 0 and out["session_ids"]["real_sessions_intact"] == a.sessions
          and out["garbage"]["unknown_or_internal"] == 0 and out["session_cap"]["held"] == a.cap
          and out["session_cap"]["refused_with"] == "RESOURCE_EXHAUSTED" and out["server_alive"]
          and not any(leaks.values()))
    out["ok"] = ok
    if a.keep:
        out["work"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
