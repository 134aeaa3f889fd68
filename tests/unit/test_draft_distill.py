"""draft-model distill on a tiny random Llama target and a few KB of text: the draft it cuts, the loss, the
CLI end to end (index and text corpora), resume after a kill and after a time budget (same weights as an
uninterrupted run), refusal of incompatible drafts, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specstore.client.draft_build import build_draft, freeze_shared
from specstore.client.draft_compat import DraftIncompatibleError, check_draft_compatible
from specstore.client.draft_corpus import batch_rows, split_windows
from specstore.client.draft_distill import (CHECKPOINT_FILE, KILL_ENV, DistillOptions, kl_loss, lr_at,
                                            target_distribution)
from specstore.client.draft_cli import main
from tests.draft_fixtures import WORDS, write_corpus, write_tiny_target, write_tokenizer

ROOT = Path(__file__).resolve().parents[2]
# a few steps of a tiny recipe: 2 of the target's 4 layers, 16-token windows
TINY = ["--layers", "2", "--seq-len", "16", "--batch", "4", "--lr", "3e-3", "--threads", "1", "-q"]
# the same for a feature head (one layer, no --layers)
TINY_HEAD = ["--feature-head", *TINY[2:]]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return write_tiny_target(tmp_path_factory.mktemp("target") / "model")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def target(target_dir):
    from specstore.client.models import load_model

    return load_model(str(target_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def index_dir(target, corpus_dir, tmp_path_factory):
    from specstore.indexers.build import BuildOptions, build_index

    out = tmp_path_factory.mktemp("index") / "idx"
    build_index([corpus_dir], out, BuildOptions(embeddings=False, progress=False), tokenizer=target[1],
                log=lambda *_: None)
    return out


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    f = Path(folder) / "feature_head.safetensors"
    return load_file(str(f if f.exists() else Path(folder) / "model.safetensors"))


# ------------------------------------------------------------------------------------------ the draft
@pytest.mark.parametrize("tied", [True, False])
def test_draft_is_cut_from_the_target(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_tiny_target(tmp_path / "m", tied=tied)
    target = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    draft = build_draft(target, [0, 2])
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    t, d = target.state_dict(), draft.state_dict()
    for k, v in d.items():
        src = k.replace("layers.1.", "layers.2.")
        assert torch.equal(v, t[src]), k
    assert torch.equal(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.") or n == "model.norm.weight" for n in trainable)
    assert "model.norm.weight" in trainable
    # the cut-down draft is not the target: it predicts something else
    x = torch.randint(0, target.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(draft.eval()(x).logits, target.eval()(x).logits, atol=1e-3)
    with pytest.raises(ValueError, match="layers 0..3"):
        build_draft(target, [0, 4])
    with pytest.raises(ValueError, match="increasing"):
        build_draft(target, [2, 1])


def test_top_k_loss_is_the_kl_and_full_k_equals_full_kl():
    torch.manual_seed(0)
    t, d = torch.randn(2, 5, 40) * 2, torch.randn(2, 5, 40)
    idx, logq = target_distribution(t, 0)
    full = kl_loss(d, idx, logq)
    p, q = torch.log_softmax(t, -1), torch.log_softmax(d, -1)
    assert torch.allclose(full, (p.exp() * (p - q)).sum(-1).mean())
    idx40, logq40 = target_distribution(t, 39)   # all but one token: close to the full KL, not equal
    assert idx40.shape == (2, 5, 39) and torch.allclose(logq40.exp().sum(-1), torch.ones(2, 5))
    assert abs(float(kl_loss(d, idx40, logq40)) - float(full)) < 0.2 * float(full)
    # top-k renormalises the target's side only: a draft equal to the target pays -log(its top-k mass) ...
    idx8, logq8 = target_distribution(t, 8)
    mass = torch.softmax(t, -1).gather(-1, idx8).sum(-1)
    assert torch.allclose(kl_loss(t, idx8, logq8), -mass.log().mean())
    # ... and one that puts all its mass on the target's top-k, in the target's proportions, pays nothing
    only_top = torch.full_like(t, -float("inf")).scatter(-1, idx8, t.gather(-1, idx8))
    assert float(kl_loss(only_top, idx8, logq8)) < 1e-6


def test_kl_decreases_on_a_fixed_batch(target):
    model, _ = target
    draft = build_draft(model, [0, 1])
    params = freeze_shared(draft)
    opt = torch.optim.AdamW(params, lr=3e-3)
    x = torch.randint(4, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        idx, logq = target_distribution(model(x).logits, 16)
    losses = []
    for _ in range(40):
        loss = kl_loss(draft(x).logits, idx, logq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # only the layers and the norm moved: the shared embedding is the target's, bit for bit
    assert torch.equal(draft.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_windows_split_and_batch_order():
    stream = np.arange(1000, dtype=np.int32)
    w = split_windows(stream, 10, 0.05, seed=3)
    assert len(w.train) + len(w.held_out) == 100 and len(w.held_out) == 5
    assert not set(w.train[:, 0].tolist()) & set(w.held_out[:, 0].tolist())
    # epoch after epoch, each window once per epoch; a step's rows depend on (seed, step) only
    rows = np.concatenate([batch_rows(95, 5, s, seed=7) for s in range(19)])
    assert sorted(rows.tolist()) == list(range(95))
    assert np.array_equal(batch_rows(95, 5, 25, seed=7), batch_rows(95, 5, 25, seed=7))
    assert not np.array_equal(batch_rows(95, 5, 19, seed=7), rows[:5])   # epoch 2 is reshuffled
    with pytest.raises(ValueError, match="too few"):
        split_windows(stream[:15], 10, 0.05, 0)
    with pytest.raises(ValueError, match="empty"):
        split_windows(stream[:0], 10, 0.05, 0)


def test_cpu_bf16_detection_reads_the_flags():
    from specstore.client.models import cpu_has_fast_bf16, fast_precision

    head = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 avx512f "
    assert cpu_has_fast_bf16(head + "amx_bf16 amx_tile\n") and cpu_has_fast_bf16(head + "avx512_bf16\n")
    assert not cpu_has_fast_bf16(head + "avx512_fp16 amx_int8\n") and not cpu_has_fast_bf16("")
    assert fast_precision(torch.device("cpu")) == ("bfloat16" if cpu_has_fast_bf16() else "float32")


def test_default_steps_and_precision_follow_what_is_trained_and_where():
    from specstore.client.draft_distill import DEFAULT_HEAD_STEPS, DEFAULT_STEPS
    from specstore.client.models import fast_precision

    assert DistillOptions("o", precision="float32").steps == DEFAULT_STEPS
    assert DistillOptions("o", feature_head=True, precision="bfloat16").steps == DEFAULT_HEAD_STEPS["bfloat16"]
    assert DistillOptions("o", feature_head=True, precision="float32").steps == DEFAULT_HEAD_STEPS["float32"]
    assert DEFAULT_HEAD_STEPS["bfloat16"] > DEFAULT_HEAD_STEPS["float32"]    # a float32 step costs ~3x as much
    assert DistillOptions("o", feature_head=True, steps=7).steps == 7
    auto = DistillOptions("o", feature_head=True, precision="auto", device="cpu")
    assert auto.precision == fast_precision(torch.device("cpu")) and auto.steps == DEFAULT_HEAD_STEPS[auto.precision]


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=0.01)
    assert lr_at(10, 100, 1.0, 10) > lr_at(50, 100, 1.0, 10) > lr_at(90, 100, 1.0, 10)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_index_end_to_end(target_dir, index_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "draft"
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(out),
                 "--steps", "30", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "held-out   top-1 agreement" in printed and "30 of 30 steps" in printed
    info = json.loads((out / "distill.json").read_text())
    assert info["complete"] and info["steps"] == 30 and info["shares_target_embedding"]
    assert info["recipe"]["corpus"]["kind"] == "index" and info["recipe"]["draft"]["init_layers"] == [0, 1]
    before, after = info["agreement"]["before"], info["agreement"]["after"]
    assert after["kl_top64"] < before["kl_top64"]                 # training helped on text it never saw
    for fig in (before, after):
        assert 0 <= fig["top1_agreement"] <= fig["top5_has_target_top1"] <= 1
    assert not (out / CHECKPOINT_FILE).exists()                   # done: the checkpoint is gone
    # a plain HF folder, loaded offline
    draft = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert draft.config.num_hidden_layers == 2 and len(tok) == draft.config.vocab_size
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), local_files_only=True)
    ttok = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    assert check_draft_compatible(target, ttok, out).shares_embedding
    # the same command again: already done; another recipe into the same folder: refused
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(out),
                 "--steps", "30", *TINY]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(out),
                 "--steps", "31", *TINY]) == 2
    err = capsys.readouterr().err
    assert "another recipe" in err and "train.steps" in err and len(err.strip().splitlines()) == 1


def test_cli_text_corpus_txt_md_jsonl(target_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "draft"
    assert main(["distill", "--model", str(target_dir), "--text", str(corpus_dir), "--out", str(out),
                 "--steps", "3", "--json", *TINY]) == 0
    info = json.loads(capsys.readouterr().out)
    files = [Path(f["path"]).name for f in info["recipe"]["corpus"]["files"]]
    assert sorted(files) == ["a.txt", "b.md", "c.jsonl"]
    assert info["corpus"]["documents"] == 1 + 1 + 40   # one per text file, one per line of the .jsonl
    assert info["steps"] == 3 and (out / "model.safetensors").exists()


def test_feature_head_distill_end_to_end_and_lossless_drafting(target_dir, index_dir, corpus_dir, tmp_path, capsys):
    """--feature-head on the index and text files together, trained in bfloat16: the head learns (held-out KL
    falls, measured in float32), its folder
    holds no copy of the target's embedding, it loads as a drafter and decodes exactly like plain decoding."""
    from specstore.client.budget import CostProfile
    from specstore.client.decoder import SpeculativeDecoder
    from specstore.client.drafters.draft_model import open_draft_model
    from specstore.client.drafters.feature_head import FeatureHeadDrafter
    from specstore.client.feature_head import FeatureHead
    from specstore.client.models import load_model
    from tests.helpers import plain_greedy

    out = tmp_path / "head"
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--text", str(corpus_dir),
                 "--out", str(out), "--steps", "30", "--precision", "bfloat16", *TINY_HEAD]) == 0
    assert "a feature head" in capsys.readouterr().out
    info = json.loads((out / "distill.json").read_text())
    assert info["complete"] and info["kind"] == "feature head" and info["draft"]["num_hidden_layers"] == 1
    assert set(info["recipe"]["corpus"]) == {"index", "text"} and info["recipe"]["train"]["precision"] == "bfloat16"
    before, after = info["agreement"]["before"], info["agreement"]["after"]
    assert after["kl_top64"] < before["kl_top64"]
    assert not (out / "model.safetensors").exists() and not any("embed" in k for k in _weights(out))
    target, tok = load_model(str(target_dir), device="cpu", dtype="float32")
    head = open_draft_model(out, target, tok)
    assert isinstance(head, FeatureHead)
    fh = FeatureHeadDrafter(head, width=3, max_depth=3, min_layer_gain=0)
    dec = SpeculativeDecoder(target, tok, [fh], profile=CostProfile.flat(17), max_budget=12)
    prompt = [4, 12, 16, 9, 4, 13, 26]      # no id 0: plain_greedy's generate() would take it for padding
    assert dec.generate(prompt, 24, eos_token_id=[]).new_tokens == plain_greedy(target, prompt, 24, eos=[])
    assert fh.stats["drafted"] > 0 and not dec.drafter_errors.counts


# ------------------------------------------------------------------------------------------- resume
def _run_args(target_dir, index_dir, out, steps=8, tiny=TINY):
    return ["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(out),
            "--steps", str(steps), "--checkpoint-every", "2", *tiny]


@pytest.mark.parametrize("tiny", [TINY, TINY_HEAD], ids=["draft", "feature-head"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, target_dir, index_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(_run_args(target_dir, index_dir, whole, tiny=tiny)) == 0
    # the same run, killed (SIGKILL) right after step 5: its last checkpoint is step 4
    cut = tmp_path / "cut"
    env = {**os.environ, KILL_ENV: "5", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "specstore.client.draft_cli",
                        *_run_args(target_dir, index_dir, cut, tiny=tiny)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpt = torch.load(cut / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["data"]["windows_seen"] == 16
    assert not (cut / "distill.json").exists()
    capsys.readouterr()
    assert main(_run_args(target_dir, index_dir, cut, tiny=tiny)) == 0
    assert "from its checkpoint at step 4 of 8" in capsys.readouterr().err
    info = json.loads((cut / "distill.json").read_text())
    assert info["complete"] and info["steps"] == 8
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run measures "before" once, at step 0: the same figure
    w = json.loads((whole / "distill.json").read_text())
    assert info["agreement"]["before"]["top1_agreement"] == w["agreement"]["before"]["top1_agreement"]
    assert info["agreement"]["after"] == {**w["agreement"]["after"], "seconds": info["agreement"]["after"]["seconds"]}


def test_time_budget_stops_with_a_usable_draft_and_resumes(target_dir, index_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(_run_args(target_dir, index_dir, whole, steps=5)) == 0
    out = tmp_path / "budget"
    # a budget far below one step: each run does one step, then checkpoints and writes the draft so far
    for i in range(1, 5):
        assert main([*_run_args(target_dir, index_dir, out, steps=5), "--max-minutes", "1e-6"]) == 0
        info = json.loads((out / "distill.json").read_text())
        assert info["steps"] == i and not info["complete"] and "time budget" in info["stopped"]
        assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == i
        assert (out / "model.safetensors").exists()
    assert "rerun the same command" in capsys.readouterr().out
    assert main([*_run_args(target_dir, index_dir, out, steps=5), "--max-minutes", "1e-6"]) == 0
    info = json.loads((out / "distill.json").read_text())
    assert info["complete"] and info["steps"] == 5 and not (out / CHECKPOINT_FILE).exists()
    a, b = _weights(whole), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(target_dir, index_dir, tmp_path, capsys, monkeypatch):
    import specstore.client.draft_distill as dd

    real = dd.batch_rows

    def rows(n, batch, step, seed):
        if step == 3:   # Ctrl-C while step 4 is being set up: three steps are done
            raise KeyboardInterrupt
        return real(n, batch, step, seed)

    monkeypatch.setattr(dd, "batch_rows", rows)
    out = tmp_path / "out"
    assert main(_run_args(target_dir, index_dir, out)) == 130
    err = capsys.readouterr().err
    assert "checkpoint saved at step 3" in err and "rerun the same command to resume" in err.splitlines()[-1]
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    monkeypatch.setattr(dd, "batch_rows", real)
    assert main(_run_args(target_dir, index_dir, out)) == 0
    assert "from its checkpoint at step 3 of 8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ compatibility
def test_check_draft_compatible_refuses_wrong_tokenizer_vocab_and_hidden(target, target_dir, tmp_path):
    model, tok = target
    # another tokenizer over the same number of words: same vocab size, other token ids
    other = write_tiny_target(tmp_path / "other-tok", words=[w + "x" for w in WORDS])
    with pytest.raises(DraftIncompatibleError, match="tokenizer .* differs from the target's"):
        check_draft_compatible(model, tok, other)
    # same tokenizer, but a draft config with another vocabulary size
    cfg = json.loads((target_dir / "config.json").read_text())
    bad_vocab = tmp_path / "bad-vocab"
    write_tokenizer(bad_vocab)
    (bad_vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    with pytest.raises(DraftIncompatibleError, match="vocabulary size"):
        check_draft_compatible(model.config, tok, bad_vocab)
    # a wider draft: fine as a free-standing draft, refused when it is meant to share the embedding
    wide = write_tiny_target(tmp_path / "wide", hidden=64)
    assert not check_draft_compatible(model, tok, wide).shares_embedding
    with pytest.raises(DraftIncompatibleError, match="hidden size 64 differs from the target's 32"):
        check_draft_compatible(model, tok, wide, shared_embedding=True)
    (wide / "distill.json").write_text(json.dumps({"shares_target_embedding": True}))
    with pytest.raises(DraftIncompatibleError, match="hidden size"):
        check_draft_compatible(model, tok, wide)
    # not a model folder / no tokenizer files
    with pytest.raises(DraftIncompatibleError, match="not a folder"):
        check_draft_compatible(model, tok, tmp_path / "nothing")
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftIncompatibleError, match="tokenizer"):
        check_draft_compatible(model, tok, no_tok)
    assert check_draft_compatible(model, tok, target_dir).fingerprint


def test_init_from_a_draft_of_another_tokenizer_is_refused(target_dir, corpus_dir, tmp_path, capsys):
    other = write_tiny_target(tmp_path / "other", words=[w + "x" for w in WORDS], layers=2)
    code = main(["distill", "--model", str(target_dir), "--text", str(corpus_dir), "--out", str(tmp_path / "o"),
                 "--init-from", str(other), "--steps", "2", "--threads", "1", "-q", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer" in err and "differs" in err and len(err.strip().splitlines()) == 1


def test_init_from_a_compatible_draft_trains_on(target_dir, index_dir, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(first),
                 "--steps", "4", *TINY]) == 0
    more = tmp_path / "more"
    tail = TINY[2:]   # the layers come from the draft
    assert main(["distill", "--model", str(target_dir), "--index", str(index_dir), "--out", str(more),
                 "--init-from", str(first), "--steps", "4", *tail]) == 0
    info = json.loads((more / "distill.json").read_text())
    assert info["recipe"]["draft"]["init_from"]["weights_sha256"] and info["draft"]["num_hidden_layers"] == 2
    a, b = _weights(first), _weights(more)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,message", [
    ([], "no corpus"),
    (["--text", "EMPTY"], "empty"),
    (["--text", "TINY_FILE"], "too few"),
    (["--text", "CORPUS", "--layers", "9"], "only 4 layers"),
    (["--text", "CORPUS", "--layers", "2", "--init-layers", "0,1,2"], "must name --layers"),
    (["--text", "CORPUS", "--init-layers", "0,7"], "layers 0..3"),
    (["--text", "BAD_JSONL"], "bad.jsonl:2"),
    (["--text", "/no/such/file"], "no such file"),
    (["--text", "CORPUS", "--feature-head", "--layers", "2"], "drop --layers"),
    (["--index", "/no/such/index"], "--index"),
    (["--index", "OTHER_IDX"], "another tokenizer"),
    (["--text", "CORPUS", "--out", "TAKEN"], "not a draft-model distill output"),
    (["--text", "CORPUS", "--top-k", "-1"], "--top-k"),
])
def test_bad_input_is_one_line_exit_2(extra, message, target_dir, corpus_dir, index_dir, tmp_path, capsys):
    from specstore.indexers.build import BuildOptions, build_index

    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "tiny.txt").write_text("the cat runs")
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"body": "the dog"}\n')
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    subs = {"EMPTY": tmp_path / "empty.txt", "TINY_FILE": tmp_path / "tiny.txt", "CORPUS": corpus_dir,
            "BAD_JSONL": tmp_path / "bad.jsonl", "IDX": index_dir, "TAKEN": tmp_path / "taken"}
    if "OTHER_IDX" in extra:
        tokdir = write_tokenizer(tmp_path / "tok", words=[w + "x" for w in WORDS])
        from transformers import AutoTokenizer

        subs["OTHER_IDX"] = tmp_path / "oidx"
        build_index([corpus_dir], subs["OTHER_IDX"], BuildOptions(embeddings=False, progress=False),
                    tokenizer=AutoTokenizer.from_pretrained(str(tokdir)), log=lambda *_: None)
    argv = [str(subs.get(a, a)) for a in extra]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(["distill", "--model", str(target_dir), *argv, "--seq-len", "16", "--steps", "2", "--threads", "1",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
