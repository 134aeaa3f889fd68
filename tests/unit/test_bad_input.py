"""Bad input gives a clear error: ValueError from the API, exit code 2 and no traceback from the CLI."""
import subprocess
import sys

import pytest

from specstore.client.decoder import SpeculativeDecoder
from specstore.datastore.model_files import ModelNotFoundError, resolve_model
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def dec():
    return SpeculativeDecoder(tiny_llama(vocab=64, max_pos=32), None, [])


@pytest.mark.parametrize("ids,kw,msg", [
    ([], {}, "empty"),
    ([1, 2, 64], {}, "outside the vocabulary"),
    ([1, -3], {}, "outside the vocabulary"),
    (list(range(3, 40)), {}, "context"),
    ([1, 2], {"max_new_tokens": 0}, "max_new_tokens"),
    ([1, 2], {"temperature": -0.5}, "temperature"),
    ([1, 2], {"top_p": 0.0}, "top_p"),
    ([1, 2], {"top_k": -1}, "top_k"),
    ([[1, 2], [3, 4]], {}, "one sequence"),
])
def test_api_errors(dec, ids, kw, msg):
    with pytest.raises(ValueError, match=msg):
        dec.generate(ids, **kw)


def test_unknown_model_path():
    with pytest.raises(ModelNotFoundError, match="never downloaded"):
        resolve_model("/no/such/model")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "specstore.client.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["--prompt", "hi", "--model", "/no/such/model"], "not found"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "2"], "top_p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompts-file", "/no/such/file.jsonl"], "no such file"),
    (["--prompt", "hi", "--drafters", "bogus", "--model", "/no/such/model"], "not found"),
])
def test_cli_errors_are_clean(args, msg):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_prompts_file_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = run_cli("--prompts-file", str(f))
    assert r.returncode == 2 and f"{f}:2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("line,extra,msg", [
    ('{"prompt": "ok", "share_output": "yes"}', [], "must be true or false"),
    ('{"prompt": "ok", "share_output": true}', [], "needs --share-stats"),
])
def test_cli_bad_share_output(tmp_path, line, extra, msg):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    r = run_cli("--prompts-file", str(f), *extra)
    assert r.returncode == 2 and f"{f}:1" in r.stderr and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--draft-model", "/no/such/draft"], "not a folder"),
    (["--draft-width", "0"], "--draft-width"),
    (["--drafters", "draft"], "--draft-model"),
])
def test_cli_bad_draft_arguments(args, msg):
    r = run_cli("--prompt", "hi", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
