"""``index-build --engine ray`` on a real local Ray instance (started once for the module): the same bytes as
the local engine, a failing task leaves the published index intact and the rerun resumes, --append agrees."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("ray")

from specstore.bench.build_crash import WORDS, write_corpus, write_tiny_embedder  # noqa: E402
from specstore.datastore.index import DatastoreIndex  # noqa: E402
from specstore.datastore.model_files import load_tokenizer  # noqa: E402
from specstore.indexers.build import CRASH_ENV, BuildOptions, EngineTaskFailed, build_index  # noqa: E402
from specstore.indexers.cli import main  # noqa: E402

#: manifest fields that say when and by which engine a build ran (everything else must be equal)
RUN_FIELDS = ("created", "created_unix", "build_seconds")


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs, 127.0.0.1) for the module, started by the engine's own code: every
    build below finds it running and uses it (Ray's start costs seconds)."""
    from specstore.indexers.ray_engine import RayEngine

    engine = RayEngine(None, 2)
    assert engine.owned and engine.width == 2
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seeded text files (one document each) and a JSON lines file of 300 short records (many tokenizer
    batches), ~20k tokens in all."""
    d = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(d / "txt", files=4, lines=60, seed=1)
    rng = random.Random(2)
    with open(d / "records.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))})
                    + "\n")
    return [*paths, str(d / "records.jsonl")]


def _files(root):
    """relative path -> bytes of every file of an index but its manifest."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(root) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    for k in RUN_FIELDS:
        m.pop(k)
    m["builder"].pop("engine")
    return m


def _assert_same_index(a, b) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and fa == fb
    assert _manifest(a) == _manifest(b)


KW = dict(shard_tokens=2000, batch_docs=8, progress=False)


def test_ray_build_is_byte_identical_to_local(ray_instance, tok, corpus, tmp_path):
    emb = write_tiny_embedder(tmp_path / "tiny-bert")
    opts = dict(KW, embedder=str(emb), chunk_tokens=64)
    quiet = dict(tokenizer=tok, log=lambda *_: None)
    build_index(corpus, tmp_path / "local", BuildOptions(**opts), **quiet)
    rep = build_index(corpus, tmp_path / "ray", BuildOptions(engine="ray", **opts), **quiet)
    m = rep.manifest
    assert m["builder"]["engine"] == "ray" and len(m["shards"]) >= 5 and m["faiss"]["num_vectors"] > 100
    assert json.loads((tmp_path / "local" / "manifest.json").read_text())["builder"]["engine"] == "local"
    _assert_same_index(tmp_path / "local", tmp_path / "ray")
    assert len(_files(tmp_path / "ray")) == 5 * len(m["shards"]) + 2   # 5 files per shard + FAISS's two
    DatastoreIndex.open(tmp_path / "ray", verify=True).close()


def test_failed_task_leaves_the_old_index_and_the_rerun_resumes(ray_instance, tok, corpus, tmp_path, monkeypatch,
                                                               capsys):
    out, ref = tmp_path / "idx", tmp_path / "ref"
    old_id = build_index(corpus[:1], out, BuildOptions(embeddings=False, **KW), tokenizer=tok).manifest["index_id"]
    old_files = _files(out)
    args = [*corpus, "--out", str(out), "--no-embeddings", "--shard-tokens", "2000", "--batch-docs", "8", "-q",
            "--engine", "ray"]
    # the suffix array task of the third shard raises inside its Ray worker
    monkeypatch.setenv(CRASH_ENV, "ray-sa:shard-00002")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Ray task suffix array of shard-00002 failed: SimulatedCrash" in err[0] and "unchanged" in err[0]
    with pytest.raises(EngineTaskFailed, match="shard-00002"):   # the library says the same, as an exception
        build_index(corpus, out, BuildOptions(engine="ray", embeddings=False, **KW), tokenizer=tok)
    ix = DatastoreIndex.open(out, verify=True)
    assert ix.index_id == old_id and _files(out) == old_files
    ix.close()
    monkeypatch.delenv(CRASH_ENV)
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "resuming" in printed.err and "resumed" in printed.out and "tokenize-00000" in printed.out
    build_index(corpus, ref, BuildOptions(embeddings=False, **KW), tokenizer=tok, log=lambda *_: None)
    _assert_same_index(out, ref)


def test_ray_append_on_a_cluster_address_equals_local_append(ray_instance, tok, corpus, tmp_path):
    """The --address path: an ``index-build`` process joins the module's running Ray instance as a cluster
    (a second driver, as on a real cluster) and appends; the result equals the local engine's append."""
    import os
    import subprocess
    import sys

    for name in ("a", "b"):
        build_index(corpus[:2], tmp_path / name, BuildOptions(embeddings=False, **KW), tokenizer=tok,
                    log=lambda *_: None)
    build_index(corpus[2:], tmp_path / "a", BuildOptions(embeddings=False, append=True, **KW), tokenizer=tok,
                log=lambda *_: None)
    address = ray_instance.ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    r = subprocess.run([sys.executable, "-m", "specstore.indexers.cli", "build", *corpus[2:], "--out",
                        str(tmp_path / "b"), "--append", "--no-embeddings", "--shard-tokens", "2000", "--batch-docs",
                        "8", "-q", "--engine", "ray", "--address", address], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    _assert_same_index(tmp_path / "a", tmp_path / "b")
    m = DatastoreIndex.open(tmp_path / "b", verify=True).manifest
    assert m["stats"]["appended_from"] and m["builder"]["engine"] == "ray"


def test_engine_flags_without_ray_say_so_in_one_line(tmp_path, monkeypatch, capsys):
    """No Ray instance needed: a missing ray package and --address without --engine ray are refused before
    anything is written."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)   # what `import ray` does where the package is absent
    base = ["build", *[str(tmp_path / "nothing.txt")], "--out", str(tmp_path / "idx"), "--no-embeddings", "-q"]
    (tmp_path / "nothing.txt").write_text("some text to index\n")
    assert main([*base, "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the ray package" in err[0] and "specstore[shared]" in err[0]
    assert main([*base, "--address", "auto"]) == 2
    assert "--address names a Ray cluster: it needs --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
