"""Shared fixtures of the serve tests: a real uvicorn server in a thread on a free loopback port, a tiny
Llama saved as a transformers directory, and PEFT-format adapters with non-zero weights for it."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import peftkit


def _load_root_conftest():
    """tests/conftest.py under another module name: this file is the `conftest` that tests in tests/serve/
    import, so its helpers (tiny models, make_tokenizer, ...) are re-exported here for them."""
    spec = importlib.util.spec_from_file_location("peftkit_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_fixture(obj) -> bool:
    return hasattr(obj, "_pytestfixturefunction") or type(obj).__name__ == "FixtureFunctionDefinition"


_root = _load_root_conftest()
globals().update({k: v for k, v in vars(_root).items() if not k.startswith("_") and not _is_fixture(v)
                  and k not in globals()})

# the server's logs (peftkit.serve.*) are read with caplog here: a handler of our own keeps create_app from
# adding its stderr one, whose lines would land in pytest's output after a test's capture has ended
logging.getLogger("peftkit.serve").addHandler(logging.NullHandler())

ADAPTER_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
ADAPTERS = {"alpha": (1, 4), "beta": (2, 8), "gamma": (3, 2)}  # name -> (seed, rank)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread; `url` is its base address."""

    def __init__(self, app, config=None) -> None:
        """`config`: a uvicorn.Config to run instead of the plain one (e.g. serve.cli.server_config's)."""
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def save_nonzero_adapter(model_dir: str, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter (non-zero A and B, so it changes outputs) for the model in `model_dir`, saved in PEFT format."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peftkit.inject(model, peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ADAPTER_TARGETS,
                                             init_lora_weights=False))
    with torch.no_grad():  # strong enough to change greedy tokens of the tiny model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peftkit.save_adapter(model, out)
    return out


@pytest.fixture(scope="session")
def adapter_sources(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters saved once per session (name -> directory); copy them before changing anything."""
    root = tmp_path_factory.mktemp("adapter-sources")
    return {name: save_nonzero_adapter(tiny_model_dir, root / name, seed, r) for name, (seed, r) in ADAPTERS.items()}


@pytest.fixture
def adapter_dir(adapter_sources, tmp_path) -> Path:
    """A fresh --adapter-dir holding copies of the session's adapters."""
    root = tmp_path / "adapters"
    root.mkdir()
    for name, src in adapter_sources.items():
        shutil.copytree(src, root / name)
    return root
