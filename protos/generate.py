"""Regenerate protos/*_pb2.py and *_pb2_grpc.py from protos/*.proto with the pinned grpcio-tools.

    python protos/generate.py            # write the generated files
    python protos/generate.py --check    # exit 1 if the checked-in files are stale

The generator is pinned (``grpcio-tools==1.85.1``, the ``dev`` extra) so that the output is byte-for-byte
reproducible; ``tests/unit/test_datastore_protos.py`` runs ``--check``.
Protos are compiled with the repository root as the include path (``protos/datastore.proto`` is the file's
registered name); protoc then writes ``from protos import ...``, which ``_relative_imports`` turns into
``from . import ...`` so that the stubs work wherever the package is installed (``specstore.protos``).
"""
from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.85.1"
ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def _generated_names(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]


def _relative_imports(path: Path) -> None:
    """protoc's absolute ``protos`` imports and module names -> the installed package's (relative imports)."""
    text = path.read_text()
    text = text.replace("from protos import ", "from . import ")
    text = text.replace("(DESCRIPTOR, 'protos.", "(DESCRIPTOR, 'specstore.protos.")
    path.write_text(text)


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto into ``out_root/protos/``; returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from grpc_tools import grpc_version

        version = grpc_version.VERSION
    if version != PINNED_GRPCIO_TOOLS:
        raise SystemExit(
            f"grpcio-tools {version} is installed but the generated code is pinned to "
            f"{PINNED_GRPCIO_TOOLS}: pip install grpcio-tools=={PINNED_GRPCIO_TOOLS}"
        )
    include = Path(grpc_tools.__file__).parent / "_proto"
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        rel = proto.relative_to(ROOT).as_posix()
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={out_root}",
                f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}",
                rel,
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {rel} (exit {rc})")
        for name in _generated_names(proto):
            _relative_imports(out_root / "protos" / name)
            written.append(out_root / "protos" / name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the checked-in files; exit 1 if stale")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            target = PROTO_DIR / f.name
            new = f.read_text()
            old = target.read_text() if target.exists() else ""
            if new != old:
                stale.append(target)
                if args.check:
                    diff = difflib.unified_diff(
                        old.splitlines(), new.splitlines(), str(target), "regenerated", lineterm="", n=1
                    )
                    print("\n".join(list(diff)[:40]), file=sys.stderr)
                else:
                    shutil.copyfile(f, target)
        if args.check:
            if stale:
                print(
                    "stale generated protobuf code: " + ", ".join(str(s.relative_to(ROOT)) for s in stale)
                    + "\nrun: python protos/generate.py",
                    file=sys.stderr,
                )
                return 1
            print("generated protobuf code is up to date")
            return 0
        for s in stale:
            print(f"wrote {s.relative_to(ROOT)}")
        if not stale:
            print("generated protobuf code is already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
