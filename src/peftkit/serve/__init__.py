"""Serving many LoRA adapters on one loaded base model: the adapter registry (LRU, reload on change),
mixed-adapter batched layers, and the continuous-batching engine. The HTTP layer lives in app.py.

    registry = AdapterRegistry(model, adapter_dir="adapters/", max_loaded=64, max_rank=64)
    engine = Engine(model, registry, max_batch=16)
    engine.start()
    handle = engine.submit(GenRequest(prompt_ids=[1, 2, 3], adapter="support-tickets", max_tokens=32))
    ids = list(handle.tokens())
"""

from .batched import SlotBank, SlotLoraLayer, unwrap_linears, wrap_linears
from .engine import Engine, sample
from .registry import AdapterError, AdapterRegistry, Lease, check_name
from .request import GenRequest, Handle, QueueFull

__all__ = [
    "AdapterError", "AdapterRegistry", "Lease", "check_name", "SlotBank", "SlotLoraLayer", "wrap_linears",
    "unwrap_linears", "Engine", "GenRequest", "Handle", "QueueFull", "sample",
]
