"""Test setup: the Triton interpreter must be chosen before any @triton.jit is imported."""
import os
import shutil

# On a machine without a GPU, Triton kernels run in its interpreter. Decided without importing
# torch.cuda (cheap and safe this early); MOVQ_TEST_GPU=1 or TRITON_INTERPRET=0 overrides.
if os.environ.get("MOVQ_TEST_GPU") != "1" and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test reaches the network: huggingface_hub (and transformers, in the CLIP tests) read this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def free_port() -> int:
    """A localhost port nobody listens on now, for torchrun's --master_port (a fixed one collides
    with concurrent runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
