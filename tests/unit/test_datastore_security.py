"""Issue 10, promise 6 (security), the checks that need no server: the token compare is constant-time and
the only one; nothing from the network is unpickled or evaluated; request handling touches no file
system; per-client session caps count right; the Docker images run as a non-root user.

The servers' side of the same promises is tests/integration/test_datastore_security.py."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from specstore.datastore import auth
from specstore.datastore.servicer import READ_METHODS, WRITE_METHODS
from specstore.datastore.sessions import SessionLimitError, SessionStore
from specstore.protos import datastore_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DATASTORE = sorted((ROOT / "datastore").glob("*.py"))
# every module that handles bytes from the network: the service, and the client's reading of answers
NETWORK_MODULES = DATASTORE + sorted((ROOT / "client").glob("datastore_*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------ the token
def test_every_rpc_is_a_read_or_a_write():
    """An RPC in neither set would need the token (fail closed) but would not be documented as either."""
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Datastore"].methods}
    assert methods == READ_METHODS | WRITE_METHODS and not READ_METHODS & WRITE_METHODS


def test_token_compare_is_constant_time(monkeypatch):
    """Every check, right or wrong, with or without the scheme, of any length, runs one compare_digest of
    two 32-byte digests: nothing about the presented value decides how long the compare takes."""
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    token = "tok-3f9a"
    cases = {"Bearer tok-3f9a": True, b"Bearer tok-3f9a": True, "Bearer tok-3f9b": False, "Bearer tok": False,
             "Bearer " + "x" * 5000: False, "tok-3f9a": False, "bearer tok-3f9a": False, "Bearer  tok-3f9a": False,
             "Bearer tok-3f9a ": False, "": False, "Bearer ": False, "Basic dG9rLTNmOWE=": False}
    for value, want in cases.items():
        assert auth.bearer_matches(value, token) is want, value
    assert calls == [(32, 32)] * len(cases)
    assert not auth.bearer_matches("Bearer ", "")   # an empty server token admits nobody
    assert not auth.has_bearer([("authorization", "Bearer tok-3f9a")], None)
    # the first authorization entry decides; another key never counts
    assert not auth.has_bearer([("authorization", "Bearer x"), ("authorization", "Bearer tok-3f9a")], token)
    assert not auth.has_bearer([("authorization-bin", b"Bearer tok-3f9a"), ("x-token", "tok-3f9a")], token)


def test_no_other_token_check_exists():
    """The bearer token is compared in datastore/auth.py only: no other module reads the authorization
    metadata, and no module compares anything named like a token with ==, != or in."""
    readers = [_rel(p) for p in DATASTORE if '"authorization"' in p.read_text() and p.name != "auth.py"]
    assert readers == []
    bad = []
    for path in DATASTORE:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(re.search(r"\b(auth_)?token\b", ast.unparse(s)) for s in sides) and \
                        not any(isinstance(s, ast.Constant) and s.value is None for s in sides):
                    bad.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []


# ------------------------------------------------------------------------------------------ deserialisation
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def test_nothing_from_the_network_is_unpickled_or_evaluated():
    """The service and the client's network modules import no unpickler, call no eval/exec, load YAML only
    safely and numpy files only without pickles (numpy's default)."""
    bad = []
    for path in NETWORK_MODULES:
        for node in ast.walk(_tree(path)):
            where = f"{_rel(path)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                bad += [f"{where}: import {a.name}" for a in node.names
                        if a.name.split(".")[0] in UNSAFE_MODULES | {"yaml"}]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES | {"yaml"}:
                bad.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in UNSAFE_CALLS or name in ("loads", "load") and "pickle" in ast.unparse(f):
                    bad.append(f"{where}: {ast.unparse(node)[:80]}")
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    bad.append(f"{where}: {ast.unparse(node)[:80]}")
    assert bad == []


# ------------------------------------------------------------------------------------------ paths and keys
# Modules that see request fields (session ids, fingerprints, prompts, context ids): they must not reach the
# file system, so that no request-supplied string is ever used as a path. The index path comes from the
# command line only (datastore/cli.py, server.py).
REQUEST_MODULES = ("servicer.py", "sessions.py", "memory.py", "wire.py", "auth.py", "public_manifest.py")
FS_MODULES = {"os", "pathlib", "shutil", "io", "glob", "tempfile"}


def test_request_handling_touches_no_file_system():
    bad = []
    for name in REQUEST_MODULES:
        path = ROOT / "datastore" / name
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in FS_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FS_MODULES:
                bad.append(f"{name}: from {node.module}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                bad.append(f"{name}:{node.lineno}: open(...)")
    assert bad == []


def test_session_keys_are_exact():
    """A session is found by its exact id only: '../', absolute paths, NUL bytes, case and prefixes of a
    real id find nothing, and leave it untouched."""
    clock = [0.0]
    store = SessionStore(ttl_s=10, clock=lambda: clock[0])
    a = store.create("", np.zeros(0), "i").session_id
    clock[0] = 5.0
    for probe in ("../" + a, "/" + a, a + "\x00", "\x00" + a, a.upper(), a[:-1], a + "/", "./" + a,
                  f"/tmp/{a}", a + "/../x", " " + a, "*", "%s", ".."):
        assert store.get(probe) is None and not store.close(probe), probe
    assert store._items[a].expires_at == 10.0     # not refreshed by the probes
    assert store.get(a) is not None


# ------------------------------------------------------------------------------------------ per-client caps
def test_sessions_per_client_are_capped_and_counted_back():
    clock = [0.0]
    store = SessionStore(ttl_s=10, max_sessions=5, clock=lambda: clock[0], max_per_owner=2)
    a1 = store.create("", np.zeros(0), "i", owner="A")
    store.create("", np.zeros(0), "i", owner="A")
    with pytest.raises(SessionLimitError):
        store.create("", np.zeros(0), "i", owner="A")
    b = [store.create("", np.zeros(0), "i", owner="B") for _ in range(2)]
    assert store.owned("A") == 2 and store.owned("B") == 2
    assert store.close(a1.session_id) and store.owned("A") == 1        # closing gives a slot back
    store.create("", np.zeros(0), "i", owner="A")
    # the store is full (max_sessions 5): LRU eviction still works and gives the evicted owner its slot back
    store.create("", np.zeros(0), "i", owner="C")
    assert len(store) == 5
    store.create("", np.zeros(0), "i", owner="C")
    assert store.evicted == 1 and store.owned("A") + store.owned("B") == 3
    clock[0] = 11.0   # expiry gives every slot back
    store.purge()
    assert len(store) == 0 and all(store.owned(o) == 0 for o in "ABC")
    assert store.get(b[0].session_id) is None


def test_client_identity_is_the_address_without_port():
    assert auth.client_identity("ipv4:10.0.0.7:53124") == auth.client_identity("ipv4:10.0.0.7:1") == "ipv4:10.0.0.7"
    assert auth.client_identity("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert auth.client_identity("ipv4:10.0.0.8:2") != "ipv4:10.0.0.7"
    assert auth.client_identity("unix:/run/x.sock") == "unix:/run/x.sock" and auth.client_identity("") == "unknown"


# ------------------------------------------------------------------------------------------ Docker images
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                op, _, rest = buf.strip().partition(" ")
                out.append((op.upper(), rest.strip()))
            buf = ""
    return out


# the folders each image's service writes (its index and cache volumes, its home)
WRITES = {"Dockerfile": ("/index", "/cache"), "Dockerfile.vllm": ("/cache",)}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_docker_image_runs_as_non_root(name):
    ins = _instructions(ROOT / name)
    users = [i for i, (op, _) in enumerate(ins) if op == "USER"]
    assert users, f"{name}: no USER"
    last_user = users[-1]
    user = ins[last_user][1].split(":")[0]
    assert user not in ("root", "0", ""), f"{name}: USER {user}"
    runs = [i for i, (op, _) in enumerate(ins) if op == "RUN"]
    assert runs and runs[-1] < last_user, f"{name}: a RUN after USER {user} runs as {user}, or USER comes too early"
    setup = " ".join(ins[i][1] for i in runs)
    m = re.search(rf"useradd\b[^&;]*--uid\s+(\d+)[^&;]*\b{user}\b", setup)
    assert m and int(m.group(1)) >= 1000, f"{name}: {user} is not made by useradd with a non-system uid"
    for folder in WRITES[name]:
        assert re.search(rf"chown\s+-R\s+{user}(:\S+)?\s+[^&;]*{folder}\b", setup), \
            f"{name}: {folder} (written by the service) is not chown -R {user}"
    assert not any(op == "USER" and arg.split(":")[0] in ("root", "0") for op, arg in ins[last_user:])


def _docker_image(tag: str) -> bool:
    """Whether a docker daemon answers here and holds ``tag`` (built by someone: CI builds no image)."""
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=20)
    return r.returncode == 0


@pytest.mark.parametrize("tag", ["specstore-datastore", "specstore-vllm"])
def test_docker_image_uid_when_a_daemon_works(tag):
    if not _docker_image(tag):
        pytest.skip(f"no docker daemon, or no {tag} image built here")
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() not in ("", "0"), out
