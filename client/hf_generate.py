"""transformers' ``generate()`` decoding with our speculative decoder: ``custom_generate=speculative_generate``.

    from specstore.client.hf_generate import speculative_generate
    out = model.generate(**inputs, custom_generate=speculative_generate, max_new_tokens=64)
    out = model.generate(**inputs, custom_generate=speculative_generate, index="./my-index",
                         do_sample=True, temperature=0.7, top_p=0.9, streamer=streamer)

``generate`` prepares everything as for its own decoding loop (``generation_config`` with ``max_length``, the
logits processors and warpers it builds from the config, the stopping criteria) and then calls the callable
in place of its sampling loop, with the keywords of the callable's own signature (``drafters``, ``index``,
...) taken out of its ``**kwargs``. Here that becomes one ``SpeculativeDecoder.stream`` call: the target
distribution after every draft node is generate's own processor list applied to that node's sequence
(``sampling.ProcessedLogits``), so greedy output is token for token that of ``generate`` and sampled output
has exactly its distribution; generate's stopping criteria are checked after every token.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Optional, Sequence

import torch

from .budget import CostProfile, default_max_budget
from .decoder import SpeculativeDecoder

# model keywords generate itself prepares for its loop; our decoder keeps its own cache and positions
_PREPARED_MODEL_KWARGS = {"attention_mask", "position_ids", "logits_to_keep", "cache", "past_key_values", "use_cache"}


def make_decoder(model, *, drafters: Optional[Sequence] = None, index: Optional[str] = None,
                 datastore: Optional[str] = None, datastore_options: Optional[dict] = None,
                 max_budget: Optional[int] = None, profile: Optional[CostProfile] = None) -> SpeculativeDecoder:
    """The decoder ``speculative_generate`` builds for one call when it is not given one.

    drafters: client.types.Drafter objects; None -> ContextDrafter + RecyclingDrafter (the CLI's default).
    index: an index folder (the embedded datastore) or datastore: "host:port" (the gRPC service): the datastore
        drafter goes first, as in spec-generate; datastore_options: more keywords of
        ``datastore_drafter.make_datastore_drafter`` (``tokenizer`` to check the index's tokenizer fingerprint,
        ``timeout_s``, ``documents``, ``memory``, ...). The caller closes it (``decoder.drafters[0].close()``).
    max_budget: draft nodes per step at most (None -> the device's default, budget.default_max_budget, at most
        what the profile measured);
    profile: the verify cost profile t(n) (None -> flat: draft up to max_budget at every step; see
        ``budget.cached_cost_profile`` for a measured one).

    Build one and pass it as ``decoder=`` to reuse it across calls: its drafters and budget controller go on
    learning, and an index is opened once.
    """
    if index is not None and datastore is not None:
        raise ValueError("give index= (a local index folder) or datastore= (HOST:PORT), not both")
    if drafters is None:
        from .drafters import ContextDrafter, RecyclingDrafter

        drafters = [ContextDrafter(), RecyclingDrafter(int(model.config.vocab_size))]
    drafters = list(drafters)
    if index is not None or datastore is not None:
        from .datastore_drafter import make_datastore_drafter

        drafters.insert(0, make_datastore_drafter(address=datastore, index_path=None if index is None else str(index),
                                                  **(datastore_options or {})))
    elif datastore_options:
        raise ValueError("datastore_options= needs index= or datastore=")
    if max_budget is None:  # as spec-generate chooses it (cli_support.choose_max_budget)
        max_budget = default_max_budget(next(model.parameters()).device.type)
        if profile is not None:
            max_budget = min(max_budget, profile.max_size - 1)
    try:
        return SpeculativeDecoder(model, None, drafters, profile=profile, max_budget=int(max_budget))
    except Exception:
        if index is not None or datastore is not None:
            drafters[0].close()
        raise


def speculative_generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                         generation_config=None, synced_gpus: bool = False, streamer=None, *,
                         drafters: Optional[Sequence] = None, index: Optional[str] = None,
                         datastore: Optional[str] = None, datastore_options: Optional[dict] = None,
                         max_budget: Optional[int] = None, profile: Optional[CostProfile] = None,
                         decoder: Optional[SpeculativeDecoder] = None, prompt_text: Optional[str] = None,
                         seed: Optional[int] = None, **model_kwargs):
    """The decoding function for ``model.generate(..., custom_generate=speculative_generate)``.

    Positional arguments are what ``generate`` passes its own loop: input_ids [1, P] (batch size 1 only),
    the LogitsProcessorList and StoppingCriteriaList it built, and the prepared GenerationConfig
    (``max_length`` = P + max_new_tokens, ``eos_token_id``, ``do_sample``, ``return_dict_in_generate``).

    Our keywords (given to ``generate``): drafters, index, datastore, datastore_options, max_budget, profile as in
    ``make_decoder`` (a decoder built for this call; a datastore drafter it opened is closed at the end), or
    decoder: a SpeculativeDecoder of this model to use instead; prompt_text: the request's text for the
    datastore's document search (token ids alone leave it out); seed: the sampling seed (None -> drawn from
    torch's generator, so ``torch.manual_seed`` makes sampled runs repeatable, as with ``generate``).

    Returns a LongTensor [1, P + new] (prompt + new tokens, EOS included when hit), or with
    ``return_dict_in_generate`` a GenerateDecoderOnlyOutput with ``sequences`` only (no scores, logits,
    attentions, hidden states or cache: asking for them raises). Options our decoder cannot honour raise
    ValueError: batch size > 1, beams, several sequences per prompt, prompt lookup, classifier-free guidance,
    padding, a cache to continue from, multimodal inputs. (``stop_strings`` are refused by transformers
    itself on this path: it does not forward ``tokenizer=`` to a callable; a StoppingCriteria of yours works.)
    """
    cfg = generation_config
    if cfg is None:
        raise ValueError("speculative_generate is called by model.generate(..., custom_generate=speculative_generate)")
    _check_supported(model, input_ids, cfg, model_kwargs)
    if decoder is not None:
        if any(x is not None for x in (drafters, index, datastore, datastore_options, max_budget, profile)):
            raise ValueError("give decoder= or the options to build one (drafters, index, datastore, "
                             "datastore_options, max_budget, profile), not both")
        if decoder.model is not model:
            raise ValueError("decoder= decodes another model than the one generate() was called on")
        dec, opened = decoder, []
    else:
        dec = make_decoder(model, drafters=drafters, index=index, datastore=datastore,
                           datastore_options=datastore_options, max_budget=max_budget, profile=profile)
        opened = dec.drafters[:1] if (index is not None or datastore is not None) else []
    if streamer is None:
        streamer = _streamer_of_generate()

    prompt_len = int(input_ids.shape[1])
    max_new = max(1, int(cfg.max_length) - prompt_len)  # generate's loop always makes at least one token
    do_sample = bool(cfg.do_sample)
    if do_sample and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    eos = cfg.eos_token_id
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    # generate's processors and warpers carry temperature, top-k, top-p and the rest; an empty list (greedy
    # with a plain config) keeps the decoder on its raw-logits path
    processor = logits_processor if logits_processor else None

    seq = torch.empty((1, prompt_len + max_new), dtype=torch.long, device=input_ids.device)
    seq[:, :prompt_len] = input_ids
    n = prompt_len
    tokens = dec.stream(input_ids[0].tolist(), max_new_tokens=max_new, temperature=1.0 if do_sample else 0.0,
                        seed=seed, eos_token_id=eos, prompt_text=prompt_text, logits_processor=processor)
    try:
        stop = False
        for toks in tokens:
            for t in toks:
                seq[0, n] = t
                n += 1
                if streamer is not None:
                    streamer.put(seq[0, n - 1: n].cpu())  # one token per put, as generate's own loop does
                if stopping_criteria and bool(stopping_criteria(seq[:, :n], None).any()):
                    stop = True
                    break
            if stop:
                break
    finally:
        tokens.close()  # ends the request: the drafters' end_request hooks run
        for d in opened:
            d.close()
        if streamer is not None:
            streamer.end()
    sequences = seq[:, :n]
    if cfg.return_dict_in_generate:
        from transformers.generation import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _check_supported(model, input_ids: torch.Tensor, cfg, model_kwargs: dict[str, Any]) -> None:
    """ValueError naming the first option of this generate call that our decoder does not honour."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("speculative_generate decodes decoder-only models; this one is encoder-decoder")
    if (cfg.num_beams or 1) > 1:
        raise ValueError(f"num_beams={cfg.num_beams}: speculative_generate decodes one beam (greedy or sampling)")
    if (cfg.num_return_sequences or 1) > 1:
        raise ValueError(f"num_return_sequences={cfg.num_return_sequences}: speculative_generate returns one "
                         "sequence per prompt; call generate once per sample")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: speculative_generate decodes a batch of "
                         "one sequence; call generate once per prompt")
    if cfg.prompt_lookup_num_tokens:
        raise ValueError("prompt_lookup_num_tokens: speculative_generate drafts with its own drafters "
                         "(the context drafter is prompt lookup); leave it unset")
    if cfg.guidance_scale is not None and cfg.guidance_scale != 1:
        raise ValueError("guidance_scale: classifier-free guidance runs a second model pass per token, which "
                         "speculative_generate does not do")
    if cfg.return_dict_in_generate:
        asked = [k for k in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
                 if getattr(cfg, k, False)]
        if asked:
            raise ValueError(f"{', '.join(asked)}: speculative_generate returns sequences only")
    other = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _PREPARED_MODEL_KWARGS)
    if other:
        raise ValueError(f"model inputs {', '.join(other)}: speculative_generate takes token ids only")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("the attention mask has padding: speculative_generate takes one unpadded sequence")
    for key in ("cache", "past_key_values"):
        cache = model_kwargs.get(key)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("a filled cache: speculative_generate starts from the prompt, not from a cache")


def _streamer_of_generate():
    """The ``streamer`` of the ``generate`` call that called us, or None.

    transformers (5.x) puts the prompt into ``generate(streamer=...)`` and then calls a callable
    ``custom_generate`` with only that callable's own keywords (``_extract_generation_mode_kwargs``), so the
    streamer would never see a new token nor ``end()`` (a TextIteratorStreamer's reader would wait forever).
    It is read from generate's frame; tests/unit/test_hf_generate.py fails loudly if that stops working.
    """
    from transformers.generation.utils import GenerationMixin

    code = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(2)  # 0: this function, 1: speculative_generate, 2: its caller (generate)
    for _ in range(4):  # or generate a few frames up, when the caller wrapped speculative_generate in a function
        if frame is None:
            return None
        if frame.f_code is code:
            return frame.f_locals.get("streamer")
        frame = frame.f_back
    return None
