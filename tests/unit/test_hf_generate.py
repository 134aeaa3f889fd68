"""transformers' generate(custom_generate=speculative_generate): greedy output token for token that of plain
generate (with eos, max_new_tokens and the logits processors greedy uses), the streamer's tokens, sampling
with exactly generate's distribution after its processors and warpers (chi-square), and clear errors."""
import numpy as np
import pytest
import torch
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.streamers import BaseStreamer

from specstore.client.drafters import ContextDrafter, RecyclingDrafter
from specstore.client.hf_generate import make_decoder, speculative_generate
from specstore.client.sampling import ProcessedLogits
from specstore.client.types import Drafter, DraftTree, Source
from tests.helpers import RandomTreeDrafter, assert_two_token_distribution, tiny_llama

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 7, 8], [20], [40, 41, 42, 40, 41, 42, 40]]


def no_eos_model(**kw):
    """A tiny random Llama whose config names no EOS (each test picks its own)."""
    model = tiny_llama(**kw)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


def test_processed_logits_give_each_node_its_own_sequence():
    """Node i's scores come from the processor called with prefix + the tokens on the path down to i."""
    tree = DraftTree.from_paths(5, [[7, 8], [9]], Source.CONTEXT)  # nodes: 0=5, 1=7, 2=8 (under 7), 3=9
    seen = []

    def processor(ids, scores):
        seen.append(ids[0].tolist())
        scores += 1.0  # writes into its input: the raw logits must not change
        return scores

    logits = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    before = logits.clone()
    pl = ProcessedLogits(logits, tree, np.array([1, 2, 5]), processor)
    assert torch.equal(pl[2], before[2] + 1) and pl.argmax[3] == 5
    assert seen == [[1, 2, 5, 7, 8], [1, 2, 5, 9]]
    pl[2]  # computed once per node
    assert len(seen) == 2 and torch.equal(logits, before)


class CountingDrafter(RandomTreeDrafter):
    """Random trees along a reference continuation; counts the drafts the target accepted."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.accepted = 0

    def observe(self, step):
        self.accepted += step.num_accepted_drafts


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts: list[list] = []
        self.ends = 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
                                     {"min_new_tokens": 12}])
def test_greedy_identical_to_generate(options):
    """Several prompts, each to max_new_tokens and again with an EOS it meets on the way."""
    model = no_eos_model()
    accepted = 0
    for p in PROMPTS:
        x = torch.tensor([p], device=model.device)
        ref = model.generate(x, max_new_tokens=40, do_sample=False, pad_token_id=0, **options)
        new = ref[0, len(p):].tolist()
        for eos in (None, new[7]):
            want = model.generate(x, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=eos, **options)
            drafter = CountingDrafter(new, len(p), 96, seed=len(p), p_true=0.8)
            got = model.generate(x, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=eos,
                                 custom_generate=speculative_generate, drafters=[drafter, ContextDrafter()],
                                 max_budget=12, **options)
            assert got.tolist() == want.tolist(), (p, eos, options)
            if eos is not None and "min_new_tokens" not in options:
                assert got[0, -1].item() == eos and got.shape[1] <= len(p) + 8
            accepted += drafter.accepted
    assert accepted > 0  # trees were verified and accepted, not only plain steps


def test_default_drafters_reused_decoder_and_dict_output():
    model = no_eos_model()
    x = torch.tensor([PROMPTS[1]], device=model.device)
    want = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0,
                                      custom_generate=speculative_generate), want)
    dec = make_decoder(model, drafters=[ContextDrafter(), RecyclingDrafter(96)])
    for _ in range(2):  # one decoder across calls: the recycling table learns, the output stays the same
        out = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             custom_generate=speculative_generate, decoder=dec)
        assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, want)
    assert dec.drafters[1].table.max() >= 0


def test_user_stopping_criteria_are_checked_after_every_token():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class SumOver(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return input_ids[:, 3:].sum(-1) > 600  # mid-step, wherever the drafts end

    model = no_eos_model()
    x = torch.tensor([PROMPTS[0]], device=model.device)
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([SumOver()]))
    want = model.generate(x, **kw)
    assert want.shape[1] < 3 + 40
    assert torch.equal(model.generate(x, custom_generate=speculative_generate, drafters=[ContextDrafter()], **kw), want)


def test_streamer_gets_the_same_tokens():
    """generate puts the prompt; speculative_generate puts each new token (one per put, as generate) and ends."""
    model = no_eos_model()
    p = PROMPTS[3]
    x = torch.tensor([p], device=model.device)
    plain, ours = Recorder(), Recorder()
    want = model.generate(x, max_new_tokens=25, do_sample=False, pad_token_id=0, streamer=plain)
    got = model.generate(x, max_new_tokens=25, do_sample=False, pad_token_id=0, streamer=ours,
                         custom_generate=speculative_generate, drafters=[ContextDrafter()])
    assert torch.equal(got, want)
    assert ours.puts == plain.puts and ours.ends == plain.ends == 1
    assert ours.puts[0] == [p] and [t for put in ours.puts[1:] for t in put] == want[0, len(p):].tolist()


class FixedTreeDrafter(Drafter):
    """The same draft tree at every step (as in test_sampling.py); counts the drafts verified."""

    source = Source.CONTEXT

    def __init__(self, paths):
        self.paths = paths
        self.drafted = 0

    def propose(self, ctx, budget):
        return DraftTree.from_paths(ctx.last_token, self.paths, self.source, [[0.5] * len(p) for p in self.paths])

    def observe(self, step):
        self.drafted += step.tree.num_drafts


def test_sampling_follows_generates_distribution():
    """The first two sampled tokens over many seeds vs generate's own probabilities after its processors
    (repetition penalty, temperature, top-k, top-p: read back from generate's output_scores)."""
    vocab = 10
    model = no_eos_model(vocab=vocab, seed=3)
    with torch.no_grad():  # sharpen the random model a little so that the test has power
        model.lm_head.weight.mul_(8.0)
    options = dict(do_sample=True, temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.3, pad_token_id=0)
    prompt = [3, 4, 5]

    def probs(ids):
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=1, output_scores=True,
                             return_dict_in_generate=True, **options)
        return torch.softmax(out.scores[0][0].double(), -1).cpu().numpy()

    first = probs(prompt)
    exact = np.stack([first[a] * probs(prompt + [a]) if first[a] > 0 else np.zeros(vocab) for a in range(vocab)])
    exact = exact.ravel()
    drafter = FixedTreeDrafter([[2, 4], [4, 2], [4, 1], [9]])
    n = 1200
    counts = np.zeros(vocab * vocab)
    for s in range(n):
        torch.manual_seed(s)  # our seed is drawn from torch's generator, as generate's sampling is
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=2,
                             custom_generate=speculative_generate, drafters=[drafter], max_budget=8, **options)
        a, b = out[0, len(prompt):].tolist()
        counts[a * vocab + b] += 1
    assert drafter.drafted > 0
    assert_two_token_distribution(counts, exact, n, vocab)


def test_seed_makes_sampling_repeatable():
    model = no_eos_model()
    x = torch.tensor([PROMPTS[0]], device=model.device)
    kw = dict(max_new_tokens=12, do_sample=True, pad_token_id=0, custom_generate=speculative_generate)
    torch.manual_seed(5)
    a = model.generate(x, **kw)
    torch.manual_seed(5)
    assert torch.equal(model.generate(x, **kw), a)
    assert torch.equal(model.generate(x, seed=11, **kw), model.generate(x, seed=11, **kw))


@pytest.mark.parametrize("kw,match", [
    (dict(input_ids=torch.tensor([[3, 4], [5, 6]])), "batch of one"),
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
    (dict(prompt_lookup_num_tokens=4), "prompt_lookup"),
    (dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
    (dict(attention_mask=torch.tensor([[0, 1, 1]])), "padding"),
    (dict(index="/nowhere", datastore="127.0.0.1:1"), "not both"),
    (dict(decoder="placeholder", drafters=[]), "not both"),
])
def test_unsupported_options_raise(kw, match):
    model = no_eos_model()
    if kw.get("decoder") == "placeholder":
        kw["decoder"] = make_decoder(model)
    kw.setdefault("input_ids", torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match=match):
        model.generate(max_new_tokens=4, pad_token_id=0, custom_generate=speculative_generate, **kw)


def test_decoder_of_another_model_is_refused():
    model, other = no_eos_model(), no_eos_model(seed=1)
    with pytest.raises(ValueError, match="another model"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, pad_token_id=0,
                       custom_generate=speculative_generate, decoder=make_decoder(other))
