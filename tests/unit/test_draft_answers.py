"""draft-model answers: the target's own greedy answers as JSON lines for self-distillation: each answer is
what plain greedy decoding gives for its prompt alone, batched or not; a rerun resumes (a line cut by a kill is
answered again); the answers feed draft-model distill --text; bad input is one line, exit 2."""
from __future__ import annotations

import json

import pytest
import torch

from specstore.client.draft_answers import PromptFileError, generate_answers, read_prompts
from specstore.client.draft_cli import main
from tests.draft_fixtures import sentences, write_tiny_target


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return write_tiny_target(tmp_path_factory.mktemp("target") / "model")


@pytest.fixture(scope="module")
def target(target_dir):
    from specstore.client.models import load_model

    return load_model(str(target_dir), device="cpu", dtype="float32")


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "q.jsonl"
    qs = sentences(7, seed=3)
    rows = [{"question": q} for q in qs[:4]] + [{"instruction": q, "input": "the cat"} for q in qs[4:6]]
    rows += [{"turns": [qs[6], "and then"]}, {"other": "no prompt here"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _greedy(model, tok, text, n):
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)


def test_read_prompts_fields(prompts_file, tmp_path):
    ps = read_prompts([prompts_file])
    assert len(ps) == 7 and ps[4].endswith("\n\nthe cat") and "and then" not in ps[6]
    (tmp_path / "l.json").write_text(json.dumps([{"q": "one two"}, {"q": "red"}]))
    assert read_prompts([tmp_path / "l.json"], field="q") == ["one two", "red"]
    with pytest.raises(PromptFileError, match="no prompts found"):
        read_prompts([tmp_path / "l.json"])


@pytest.mark.parametrize("batch", [1, 3])
def test_answers_are_plain_greedy_and_a_rerun_resumes(target, prompts_file, tmp_path, batch):
    model, tok = target
    ps = read_prompts([prompts_file])
    full = tmp_path / "full.jsonl"
    info = generate_answers(model, tok, ps, full, batch=batch, max_new_tokens=6, progress=False)
    assert info["answered_now"] == len(ps) and info["complete"]
    lines = full.read_text().splitlines()
    texts = [json.loads(x)["text"] for x in lines]
    assert sorted(next(p for p in ps if t.startswith(p)) for t in texts) == sorted(ps)   # one answer each
    if batch == 1:       # unpadded: exactly plain greedy decoding of each prompt
        with torch.inference_mode():
            for text in texts:
                prompt = next(p for p in ps if text.startswith(p))
                assert text == prompt + _greedy(model, tok, prompt, 6)
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:2]) + '\n{"text": "cut by a ki')   # killed mid-line after two answers
    info = generate_answers(model, tok, ps, part, batch=batch, max_new_tokens=6, progress=False)
    assert info["answered_before"] == 2 and info["answered_now"] == len(ps) - 2 and info["complete"]
    again = part.read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == len(ps)
    if batch == 1:
        assert again == lines


def test_cli_answers_then_distill(target_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["answers", "--model", str(target_dir), "--prompts", str(prompts_file), "--out", str(out),
                 "--max-new-tokens", "12", "--batch", "4", "--quiet", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["answered_now"] == 7 and len(out.read_text().splitlines()) == 7
    draft = tmp_path / "draft"
    assert main(["distill", "--model", str(target_dir), "--text", str(out), "--out", str(draft), "--layers", "1",
                 "--steps", "2", "--seq-len", "16", "--batch", "2", "--eval-windows", "2", "--quiet",
                 "--device", "cpu"]) == 0
    assert (draft / "config.json").exists()


def test_cli_answers_in_bfloat16_are_the_bfloat16_targets_greedy(target_dir, prompts_file, tmp_path, monkeypatch):
    from specstore.client import draft_answers
    from specstore.client.models import load_model

    seen = []
    real = draft_answers.generate_answers
    monkeypatch.setattr(draft_answers, "generate_answers",
                        lambda model, *a, **kw: seen.append(model.dtype) or real(model, *a, **kw))
    out = tmp_path / "answers.jsonl"
    assert main(["answers", "--model", str(target_dir), "--prompts", str(prompts_file), "--out", str(out),
                 "--max-new-tokens", "5", "--batch", "1", "--quiet", "--device", "cpu", "--precision", "bfloat16"]) == 0
    assert seen == [torch.bfloat16]
    model, tok = load_model(str(target_dir), device="cpu", dtype="bfloat16")
    ps = read_prompts([prompts_file])
    with torch.inference_mode():
        for line in out.read_text().splitlines():
            text = json.loads(line)["text"]
            prompt = next(p for p in ps if text.startswith(p))
            assert text == prompt + _greedy(model, tok, prompt, 5)


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "/nonexistent/q.jsonl"], "no such file"),
    (["--batch", "0"], "must be positive"),
])
def test_bad_input_is_one_line_exit_2(extra, message, target_dir, prompts_file, tmp_path, capsys):
    args = ["answers", "--model", str(target_dir), "--out", str(tmp_path / "a.jsonl"), "--quiet"]
    if "--prompts" not in extra:
        args += ["--prompts", str(prompts_file)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_passages_become_task_prompts(tmp_path):
    from specstore.client.draft_answers import PASSAGE_TASKS, passage_prompts, read_passages

    para = "word " * 80                                      # 400 characters
    (tmp_path / "a.md").write_text(f"# Title\n\n{para}\n\n{para}\n\n{para}\n\n{para}\n")
    (tmp_path / "b.txt").write_text("too short\n\nalso short\n")
    ps = read_passages([tmp_path])
    assert len(ps) == 2 and all(300 <= len(p) <= 1500 for p in ps)   # paragraphs joined up to 1,500 chars
    prompts = passage_prompts(ps, seed=1)
    assert prompts == passage_prompts(ps, seed=1)                      # a fixed draw per seed
    assert all(any(p == t.format(p=x) for t in PASSAGE_TASKS) for p, x in zip(prompts, ps))
    with pytest.raises(PromptFileError, match="no passages"):
        read_passages([tmp_path / "b.txt"])


def test_a_long_prompt_is_cut_before_the_template(target, tmp_path):
    """The prompt is cut to max_prompt_tokens before formatting, so the end of the formatted text (the
    template's assistant turn, when there is one) is always there and the answer follows the whole cut prompt."""
    from specstore.client.draft_answers import _cut

    model, tok = target
    long = " ".join(sentences(40, seed=5))
    out = tmp_path / "a.jsonl"
    generate_answers(model, tok, [long], out, batch=1, max_new_tokens=4, max_prompt_tokens=16, progress=False)
    text = json.loads(out.read_text())["text"]
    cut = _cut(tok, long, 16)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 16 < len(tok(long)["input_ids"])
    with torch.inference_mode():
        assert text == cut + _greedy(model, tok, cut, 4)


def test_cli_passages(target_dir, tmp_path, capsys):
    (tmp_path / "doc.md").write_text(("alpha beta gamma " * 30 + "\n\n") * 3)
    out = tmp_path / "answers.jsonl"
    assert main(["answers", "--model", str(target_dir), "--passages", str(tmp_path / "doc.md"), "--out", str(out),
                 "--max-new-tokens", "4", "--quiet", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answered_now"] == 2   # 2 passages
    assert main(["answers", "--model", str(target_dir), "--out", str(out), "--quiet"]) == 2
    assert "--passages" in capsys.readouterr().err
