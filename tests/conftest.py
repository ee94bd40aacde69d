import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama chat model (Llama-3 template) on disk."""
    from workbench.testing import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "llama3", family="llama3")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from workbench import load_model

    return load_model(str(tiny_dir), device="cpu")
