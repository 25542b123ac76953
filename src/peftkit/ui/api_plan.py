"""The plan page's API: `peftkit plan` as a form. The same estimate, GPU table, recommendation and fixes as
`peftkit plan --json`, computed by the planner's own functions (plan.memory, plan.hardware), plus each
term in bytes for the chart. The model is a preset name, or a config.json / model folder under the
console's folder (never a path outside it).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..plan import hardware, memory, presets
from .api_runs import folder_of
from .folder import UiError

router = APIRouter()


class PlanRequest(BaseModel):
    """The form's fields, bounded; the names and defaults are `peftkit plan`'s flags."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1024)
    method: str = Field("lora", max_length=64)
    r: int = Field(16, ge=1, le=65536)
    target_modules: str = Field("all-linear", max_length=1024)
    batch_size: int = Field(1, ge=1, le=1 << 16)
    seq_len: int = Field(512, ge=1, le=1 << 22)
    gradient_checkpointing: bool = False
    optimizer: str = Field("adamw", max_length=32)
    dtype: str = Field("bfloat16", max_length=32)
    adapter_dtype: str = Field("float32", max_length=32)
    gpus: int = Field(1, ge=1, le=hardware.MAX_GPUS)
    device: str = Field("cuda", max_length=16)
    max_memory: float | None = Field(None, gt=0, le=1 << 20)


def targets(text: str) -> str | tuple[str, ...]:
    """'all-linear', 'attention' or a comma-separated list of layer names, as `peftkit plan` reads them."""
    text = text.strip()
    return text if text in ("all-linear", "attention") else tuple(t.strip() for t in text.split(",") if t.strip())


def shape_of(request: Request, model: str) -> presets.ModelShape:
    """A preset by name, else a config.json or model folder under the console's folder."""
    key = model.strip().lower()
    if presets.ALIASES.get(key, key) in presets.PRESETS:
        return presets.resolve(key)
    where = folder_of(request).resolve(model, "model")
    try:
        return presets.resolve(str(where))
    except ValueError as err:
        raise UiError(422, str(err)) from None


def plan_record(shape: presets.ModelShape, settings: memory.Settings, max_memory: float | None) -> dict:
    """`peftkit plan --json`'s record for one setup, with each term also in bytes."""
    est = memory.estimate(shape, settings)
    target = hardware.target_gpu(max_memory)
    return est.to_dict() | {"gpus": hardware.table(est), "recommendation": hardware.recommend(est),
                            "fit_legend": hardware.legend(), "target": target.name,
                            "fixes": hardware.fixes(est, target),
                            "parts_bytes": dict(est.parts), "total_bytes": est.total}


@router.get("/api/plan/choices")
def choices() -> dict:
    """What the form offers: presets, methods, optimizers, dtypes and devices, with `peftkit plan`'s defaults."""
    return {"presets": sorted(presets.PRESETS), "aliases": sorted(presets.ALIASES), "methods": list(memory.METHODS),
            "optimizers": list(memory.OPTIMIZERS), "dtypes": list(memory.DTYPES),
            "devices": list(memory.RUNTIME_BYTES), "defaults": PlanRequest(model="llama-2-7b").model_dump()}


@router.post("/api/plan")
def plan(request: Request, body: PlanRequest) -> dict:
    """The estimate for the form's setup (422 naming the field for a setup the planner refuses)."""
    shape = shape_of(request, body.model)
    settings = memory.Settings(method=body.method, r=body.r, targets=targets(body.target_modules),
                               batch_size=body.batch_size, seq_len=body.seq_len,
                               gradient_checkpointing=body.gradient_checkpointing, optimizer=body.optimizer,
                               dtype=body.dtype, adapter_dtype=body.adapter_dtype, num_gpus=body.gpus,
                               device=body.device)
    try:
        return plan_record(shape, settings, body.max_memory)
    except (ValueError, KeyError) as err:
        raise UiError(422, f"the planner refuses this setup: {err}") from None
