"""The tiny random Llama that the tests, the fault campaign and the half-precision probe decode with: built from a
config (no download), seeded, in eval mode."""
from __future__ import annotations

from typing import Optional

import torch


def tiny_llama(vocab: int = 96, seed: int = 0, layers: int = 2, attn: str = "sdpa", max_pos: int = 512,
               hidden: int = 32, device: str = "cpu", dtype: Optional[torch.dtype] = None, eos: int = 2):
    """A Llama of width ``hidden`` (MLP 2x), 4 query / 2 key-value heads, untied output head; bos 1, pad 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      bos_token_id=1, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
