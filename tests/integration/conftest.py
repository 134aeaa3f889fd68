import pytest
import torch


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (model, tokenizer) in float32, loaded once for the integration tests (the
    default, ``--dtype auto``, is bfloat16 on CPUs with AMX or AVX512-BF16; test_smollm2_e2e.py tests that
    too)."""
    from specstore.client.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model(dtype="float32")
    yield model, tok
    torch.set_num_threads(1)
