"""The room rules of README and DESIGN, checked: which room may import which, and what each may not load.

    bench -> client -> datastore <- indexers; every room may import protos; protos imports nothing of ours.
    client/ never imports faiss; datastore/ and indexers/ never import torch.

Two checks: importing every module of a room in a fresh interpreter and looking at sys.modules (what a
user of the room really pays for), and the source of every module (ast), which also sees the imports inside
functions and the import style (relative inside the package, never the bare room names).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("client", "datastore", "indexers", "protos", "bench")

# the rooms each room may import from (itself included)
ALLOWED = {
    "protos": {"protos"},
    "datastore": {"datastore", "protos"},
    "indexers": {"indexers", "datastore", "protos"},
    "client": {"client", "datastore", "protos"},
    "bench": set(ROOMS),
}
# third-party top-level modules a room must never import, even lazily
NEVER = {"client": {"faiss"}, "datastore": {"torch"}, "indexers": {"torch"}}

# Exceptions to ALLOWED, as (file, imported module); none today. The test fails on an entry that no longer occurs.
KNOWN_VIOLATIONS: set = set()

# Imports every module of one room in turn (found on disk: walking the package would import subpackages
# early) and names, for each forbidden package that got loaded, the first module whose import loaded it.
PROBE = textwrap.dedent("""
    import importlib, json, sys
    from pathlib import Path
    room, forbid, allow = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    match = lambda m, ps: any(m == p or m.startswith(p + ".") for p in ps)
    pkg = importlib.import_module("specstore." + room)
    base = Path(pkg.__path__[0])
    names = sorted(".".join(("specstore", room, *f.relative_to(base).with_suffix("").parts)).removesuffix(".__init__")
                   for f in base.rglob("*.py"))
    out = {"imported": [], "skipped": {}, "violations": {}}
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:   # an optional third-party dependency that is not installed
            if (e.name or "").startswith("specstore"):
                raise
            out["skipped"][name] = e.name
            continue
        out["imported"].append(name)
        for m in list(sys.modules):
            if match(m, forbid) and not match(m, allow):   # reported by distribution or room: torch, specstore.x
                key = ".".join(m.split(".")[:2 if m.startswith("specstore.") else 1])
                out["violations"].setdefault(key, name)
    print(json.dumps(out))
""")

# room -> (forbidden module prefixes, allowed exceptions); the ROOT check runs outside the checkout
LOADS = {
    "client": (["faiss"], []),
    "datastore": (["torch", "specstore.client", "specstore.indexers", "specstore.bench"], []),
    "indexers": (["torch", "specstore.client", "specstore.bench"], []),
    "protos": (["specstore"], ["specstore.protos"]),
}


@pytest.mark.parametrize("room", sorted(LOADS))
def test_importing_a_room_loads_nothing_it_must_not(room, tmp_path):
    forbid, allow = LOADS[room]
    r = subprocess.run([sys.executable, "-c", PROBE, room, json.dumps(forbid), json.dumps(allow)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert len(out["imported"]) >= 2, out   # the probe found and imported the room's modules
    # "specstore" is the namespace itself, loaded by any import of ours
    violations = {m: by for m, by in out["violations"].items() if m != "specstore"}
    assert not violations, f"loaded by importing specstore.{room} (module: first importer): {violations}"


def _package(path: Path) -> list[str]:
    """['specstore', room, ...] of the package that holds ``path`` (a file under ROOT/<room>/)."""
    return ["specstore", *path.relative_to(ROOT).parent.parts]


def _imports(path: Path):
    """(line, absolute module name or None, absolute target, as written) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, a.name
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            if node.level == 0:
                yield node.lineno, node.module, written
                continue
            pkg = _package(path)
            base = pkg[: len(pkg) - node.level + 1]
            if node.module:
                yield node.lineno, ".".join([*base, node.module]), written
            else:   # from . import x: x may be a module of base
                for a in node.names:
                    yield node.lineno, ".".join([*base, a.name]), written


def _source_files(room: str) -> list[Path]:
    return sorted(p for p in (ROOT / room).rglob("*.py") if "__pycache__" not in p.parts)


def test_sources_import_one_way():
    problems, seen = [], set()
    for room in ROOMS:
        for path in _source_files(room):
            rel = path.relative_to(ROOT).as_posix()
            for line, target, written in _imports(path):
                top = target.split(".")[0]
                where = f"{rel}:{line}: {written}"
                if top in ROOMS:
                    problems.append(f"{where}: a bare room name (use relative imports inside the package)")
                elif top == "specstore" and not written.startswith("."):
                    problems.append(f"{where}: absolute import of our own package (use a relative import)")
                elif top == "specstore":
                    parts = target.split(".")
                    other = parts[1] if len(parts) > 1 else None
                    if other in ROOMS and other not in ALLOWED[room]:
                        if (rel, target) in KNOWN_VIOLATIONS:
                            seen.add((rel, target))
                        else:
                            problems.append(f"{where}: {room}/ may not import from {other}/")
                elif top in NEVER.get(room, ()):
                    problems.append(f"{where}: {room}/ never imports {top}")
    assert not problems, "\n".join(problems)
    assert seen == KNOWN_VIOLATIONS, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - seen)}"


def test_tests_use_the_package_names():
    problems = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, target, written in _test_imports(path):
            if target.split(".")[0] in ROOMS:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {written}")
    assert not problems, "bare room names (import specstore.<room> instead):\n" + "\n".join(problems)


def _test_imports(path: Path):
    """Absolute imports of a test file (its relative ones are tests.* modules)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module, node.module
