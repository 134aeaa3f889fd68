import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# tiny test models run faster on one thread (and do not fight the second core under CI load)
torch.set_num_threads(1)

# tests/vllm runs in the vLLM environment (.venv-vllm), which scripts/test.sh drives separately
collect_ignore = [] if __import__("importlib.util").util.find_spec("vllm") else ["vllm"]
