"""Tiny targets and corpora for draft-model tests: a random Llama saved as a Hugging Face folder with a
word-level tokenizer (so it loads offline like a real model), and a few KB of text in the formats the
distiller reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = ("the a one two red blue small big cat dog bird fish runs sees eats likes jumps sleeps over under near "
         "with and but then now here there fast slow quiet loud tree house river hill road stone cloud sun moon "
         "rain wind day night morning evening green old young happy tired").split()


def write_tokenizer(folder: Path, words=WORDS) -> Path:
    """A word-level fast tokenizer over SPECIALS + ``words`` (ids in that order), saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def write_tiny_target(folder: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0, tied: bool = True,
                      init_std: float = 0.3, words=WORDS) -> Path:
    """A random Llama (``layers`` x ``hidden``, tied embedding like SmolLM2's) plus its tokenizer, as a
    Hugging Face model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    write_tokenizer(folder, words)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(SPECIALS) + len(words), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=tied, initializer_range=init_std)
    # a wider init than Llama's 0.02: every layer then moves the prediction, so a cut-down draft starts
    # off the target and has something to learn
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    return folder


def sentences(n: int, seed: int = 0, words=WORDS) -> list[str]:
    """``n`` pseudo-sentences with repeated phrases (so there is structure to learn)."""
    rng = np.random.default_rng(seed)
    phrases = [" ".join(rng.choice(words, size=int(rng.integers(3, 7)))) for _ in range(12)]
    return [" ".join(phrases[int(i)] for i in rng.integers(0, len(phrases), size=int(rng.integers(2, 5))))
            for _ in range(n)]


def write_corpus(folder: Path, n: int = 120) -> Path:
    """A few KB of text: a .txt file, a .md file and a JSON lines file with a "text" field."""
    folder = Path(folder)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    s = sentences(n)
    third = n // 3
    (folder / "a.txt").write_text("\n".join(s[:third]) + "\n")
    (folder / "sub" / "b.md").write_text("\n".join(s[third:2 * third]) + "\n")
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in s[2 * third:]))
    return folder
