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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(script_text, *args, nproc=2)``: run a Python script under ``torch.distributed.run`` with
    ``nproc`` local processes (gloo on CPU, one thread each, offline); returns the ``CompletedProcess``."""
    import subprocess
    import sys

    def run(script: str, *args, nproc: int = 2, timeout: int = 300):
        path = tmp_path / f"torchrun_worker_{len(list(tmp_path.glob('torchrun_worker_*.py')))}.py"
        path.write_text(script)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(path), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from threads on a shared machine, and the
    torchrun ranks (one thread each) reduce bit-equal with a one-thread reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
