import pytest
import torch


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (model, tokenizer), loaded once for the integration tests."""
    from specstore.client.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model()
    yield model, tok
    torch.set_num_threads(1)
