"""The built wheel, installed into a fresh virtual environment outside the checkout, works on its own.

The wheel is built from a copy of the checkout's sources and installed with --no-deps; the dependencies
already installed for this interpreter are made visible through a .pth file that lists its sys.path
directories. Directories added that way do not run their own .pth files, so the checkout's editable install
(a finder hooked in by a .pth file) cannot leak in: the test checks that ``specstore`` resolves inside the
new environment. Everything then runs from the new environment's bin/ with the working directory outside
the checkout: every console script's --help and --version, the health check's --help, a tiny index-build,
and a tiny embedded decode that must equal plain decoding.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("client", "datastore", "indexers", "protos", "bench")
SCRIPTS = ("spec-generate", "spec-bench", "index-build", "datastore-serve", "draft-model")
PACKAGE_DATA = ("specstore/client/drafters/token_recycle_tree.json", "specstore/protos/datastore.proto")

WORDS = [f"w{i}" for i in range(1020)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]   # ids 0..3: pad, bos, eos, unk as in the tiny Llama's config


def _sh(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _build_wheel(out: Path, tmp: Path) -> Path:
    """The wheel of a copy of the sources (an in-tree build would leave build/ behind, possibly stale)."""
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for room in ROOMS:
        shutil.copytree(ROOT / room, src / room, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", out, "."], cwd=src)
    (wheel,) = out.glob("specstore-*.whl")
    return wheel


def _dependency_dirs(cwd: Path) -> list[str]:
    """This interpreter's sys.path without the standard library and without the checkout."""
    r = _sh([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], cwd=cwd,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    # the base interpreter's standard library (in a venv, sysconfig's platstdlib is the venv's own lib/pythonX.Y,
    # which holds its site-packages: so ask for the base installation's paths)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    stdlib = {Path(sysconfig.get_path(k, vars=base)).resolve() for k in ("stdlib", "platstdlib")}
    out = []
    for p in json.loads(r.stdout):
        path = Path(p).resolve() if p else None
        if path is None or not path.is_dir() or path == ROOT or path == cwd.resolve():
            continue
        if any(path == s or s in path.parents for s in stdlib) and "site-packages" not in path.parts:
            continue
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(bin folder, environment, working folder) of a fresh venv with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp / "dist", tmp)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"specstore", f"specstore-{metadata.version('specstore')}.dist-info"}, tops
    for data in PACKAGE_DATA:
        assert data in names
    for room in ROOMS:
        assert f"specstore/{room}/__init__.py" in names

    env_dir = tmp / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp)
    bin_dir = env_dir / "bin"
    py = bin_dir / "python"
    _sh([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    site = Path(_sh([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).stdout.strip())
    (site / "zz_dependencies.pth").write_text("\n".join(_dependency_dirs(tmp)) + "\n")

    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SPECSTORE_CACHE=str(tmp / "cache"),
               TMPDIR=str(tmp), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    where = _sh([py, "-c", "import specstore.client, specstore.datastore.cli as c, sys; "
                           "print(specstore.client.__file__); print(c.__file__)"], cwd=work, env=env).stdout
    for line in where.split():
        assert Path(line).is_relative_to(site), where   # the installed wheel, not the checkout
    return bin_dir, env, work


@pytest.mark.parametrize("name", SCRIPTS)
def test_console_scripts_help_and_version(venv, name):
    bin_dir, env, work = venv
    r = _sh([bin_dir / name, "--help"], cwd=work, env=env)
    assert r.stdout.startswith("usage: ") and "--version" in r.stdout
    r = _sh([bin_dir / name, "--version"], cwd=work, env=env)
    assert r.stdout == f"{name} {metadata.version('specstore')}\n"


def test_healthcheck_module_help(venv):
    bin_dir, env, work = venv
    r = _sh([bin_dir / "python", "-m", "specstore.datastore.healthcheck", "--help"], cwd=work, env=env)
    assert "HOST:PORT" in r.stdout


def _tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama and a word-level tokenizer over WORDS, saved as a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import tiny_llama

    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    tiny_llama(vocab=len(vocab), seed=3, max_pos=512).cpu().save_pretrained(str(folder))
    return folder


def test_tiny_index_build_and_embedded_decode(venv):
    bin_dir, env, work = venv
    model = _tiny_model(work / "model")
    # a few KB of text with repeated phrases, so that the index has continuations to draft
    phrases = [" ".join(WORDS[i:i + 12]) for i in range(0, 600, 37)]
    (work / "corpus.txt").write_text("\n".join(phrases[i % len(phrases)] + " " + phrases[(3 * i) % len(phrases)]
                                               for i in range(120)) + "\n")
    r = _sh([bin_dir / "index-build", "build", "corpus.txt", "--out", "idx", "--model", model, "--no-embeddings",
             "-q"], cwd=work, env=env)
    assert "idx" in r.stdout
    _sh([bin_dir / "index-build", "inspect", "idx", "--verify"], cwd=work, env=env)

    prompt = phrases[2]
    common = ["--raw", "--prompt", prompt, "--model", model, "--max-new-tokens", "24", "--json", "--threads", "1"]
    spec = json.loads(_sh([bin_dir / "spec-generate", *common, "--index", "idx", "--compare-plain"],
                          cwd=work, env=env).stdout.splitlines()[-1])
    plain = json.loads(_sh([bin_dir / "spec-generate", *common, "--no-speculation"],
                           cwd=work, env=env).stdout.splitlines()[-1])
    assert spec["identical_to_plain"] is True
    assert spec["text"] == plain["text"] and spec["new_tokens"] == plain["new_tokens"] > 0
