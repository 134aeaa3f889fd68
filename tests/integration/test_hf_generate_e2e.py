"""The real SmolLM2-135M-Instruct through transformers' generate(custom_generate=speculative_generate):
token for token the output of plain greedy generate, with the default drafters and with an embedded index;
a TextIteratorStreamer gets the same text."""
from transformers import TextIteratorStreamer

from specstore.client.hf_generate import make_decoder, speculative_generate

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "What are Rust's ownership rules?",
    "Translate to French: I like to read books in the garden when the weather is nice.",
]
CORPUS = ("Rust's ownership rules: each value in Rust has an owner. There can only be one owner at a time. "
          "When the owner goes out of scope, the value will be dropped.")


def test_generate_greedy_identical(smol, tmp_path):
    from specstore.indexers.build import BuildOptions, build_index

    model, tok = smol
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "rust.txt").write_text(CORPUS)
    build_index([str(tmp_path / "corpus")], tmp_path / "index", BuildOptions(progress=False, embeddings=False),
                tokenizer=tok, log=lambda *_: None)
    with_index = make_decoder(model, index=str(tmp_path / "index"),
                              datastore_options={"tokenizer": tok, "documents": False})
    try:
        for p in PROMPTS:
            inputs = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
            n = inputs["input_ids"].shape[1]
            want = model.generate(**inputs, max_new_tokens=48, do_sample=False)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            got = model.generate(**inputs, max_new_tokens=48, do_sample=False, streamer=streamer,
                                 custom_generate=speculative_generate)
            assert got.tolist() == want.tolist(), p
            assert "".join(streamer) == tok.decode(want[0, n:], skip_special_tokens=True)
            got = model.generate(**inputs, max_new_tokens=48, do_sample=False, custom_generate=speculative_generate,
                                 decoder=with_index)
            assert got.tolist() == want.tolist(), p
        assert with_index.drafters[0].stats["hits"] > 0  # the index drafted
    finally:
        with_index.drafters[0].close()
