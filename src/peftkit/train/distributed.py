"""More than one process: torchrun set-up, data-parallel LoRA, and FSDP2 for bases too big for one device.

Two ways to train on N processes, both started by torchrun (or `peftkit train --nproc N`, see `launch`):

- Data parallel (the base fits on every device). Every rank holds the whole model; after `backward()` the
  training loop calls `all_reduce_gradients` on the trainable (adapter) parameters, which averages them in one
  collective. Only the adapters' gradients travel, so this is cheaper than wrapping the model in DDP, and the
  user's model stays the user's model (no wrapper object).
- Sharded base (`shard_frozen_base`, FSDP2's `fully_shard`): each rank keeps 1/N of every parameter and
  gathers a decoder layer's weights just before it runs. FSDP averages the gradients itself (reduce-scatter),
  so `all_reduce_gradients` skips FSDP-managed parameters.

For the averaged gradient to equal the single-process one, each rank's loss must be a mean over the same
number of tokens (or a sum divided by the GLOBAL token count): the average of per-rank means is the global
mean only when the per-rank counts are equal.

Device-agnostic: gloo on CPU, nccl on CUDA (torch's default backend for the device type otherwise).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from .. import hf
from ..record import wrappers

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among world_size processes, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        """True on the one process that logs, saves checkpoints and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when there is more than one process (collectives do something)."""
        return self.world_size > 1


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    """None: cuda:local_rank when CUDA is there, else CPU. "cuda": cuda:local_rank. Anything else as given."""
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    picked = torch.device(device)
    if picked.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for, but this torch build sees no CUDA device; "
                               "use --device cpu (device='cpu' from Python), or install a CUDA build of torch")
        if picked.index is None:
            picked = torch.device("cuda", local_rank)
    return picked


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment, or return a single-process Dist.

    With WORLD_SIZE > 1 (and RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set, as torchrun does) this starts
    the default process group: nccl when the device is CUDA, gloo on CPU. Calling it again, or after the
    caller started the group itself, joins nothing new and returns the same Dist.
    """
    if tdist.is_available() and tdist.is_initialized():
        rank, world_size = tdist.get_rank(), tdist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world_size, local_rank, _pick_device(device, local_rank))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=_pick_device(device, 0))
    missing = [k for k in TORCHRUN_VARS if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; start the processes with "
                           "torchrun (python -m torch.distributed.run) or `peftkit train --nproc N`")
    if not tdist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with distributed support")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = tdist.Backend.default_device_backend_map.get(dev.type, "gloo")
    tdist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, dev)


def cleanup(dist: Dist) -> None:
    """Leave the process group (at the end of training, on every rank)."""
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    """Wait until every rank got here (for example before rank 0 reads what all ranks wrote)."""
    if not dist.enabled:
        return
    if dist.device.type == "cuda":
        tdist.barrier(device_ids=[dist.device.index])
    else:
        tdist.barrier()


def _is_dtensor(t: torch.Tensor) -> bool:
    """True for a parameter FSDP2 manages (a DTensor): its gradient is averaged by FSDP itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor, and then no FSDP2 either
        return False
    return isinstance(t, DTensor)


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by dtype: one contiguous buffer (one collective) per group."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _adapter_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters, and the buffers of adapter wrappers (not those of their frozen base)."""
    state = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for path, wrapper in wrappers(model):
        state += [(f"{path}.{n}", b) for n, b in wrapper.named_buffers() if not n.startswith("base.")]
    return state


@torch.no_grad()
def broadcast_trainable(model: nn.Module, dist: Dist) -> None:
    """Make every rank start from rank 0's adapters: trainable parameters and adapter buffers.

    Call it after `peftkit.inject` and before `shard_frozen_base` (FSDP2 does not broadcast; it shards
    whatever each rank holds, so every rank must hold the same values before sharding).
    """
    if not dist.enabled:
        return
    state = _adapter_state(model)
    sharded = [n for n, t in state if _is_dtensor(t)]
    if sharded:
        raise RuntimeError(f"broadcast_trainable found FSDP-sharded tensors ({', '.join(sharded[:5])}...); "
                           "call it before shard_frozen_base")
    tensors = [t for _, t in state]
    for group in _by_dtype(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1).to(dist.device) for i in group])
        tdist.broadcast(flat, src=0)
        offset = 0
        for i in group:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n


@torch.no_grad()
def all_reduce_gradients(params: list[torch.nn.Parameter], dist: Dist) -> None:
    """Average the gradients of `params` over all ranks, in place: one all_reduce of one flat buffer.

    A parameter whose grad is None contributes zeros; it gets the averaged grad when any rank had one, and
    stays None when no rank had one (so every rank's optimizer steps the same parameters). Call it after
    `backward()` and before the optimizer step. Parameters FSDP manages (shard_frozen_base) are skipped:
    FSDP has already averaged their gradients, and a second average would corrupt them.
    """
    if not dist.enabled:
        return
    local = [p for p in params if not _is_dtensor(p)]
    for group in _by_dtype(local):
        ps = [local[i] for i in group]
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                 device=p.device) for p in ps]
        has_grad = torch.tensor([p.grad is not None for p in ps], dtype=ps[0].dtype, device=dist.device)
        flat = torch.cat([*(t.to(dist.device) for t in parts), has_grad])  # (sum numel + len(ps),)
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        total = flat.numel() - len(ps)
        flat[:total].div_(dist.world_size)
        offset = 0
        for p, any_grad in zip(ps, flat[total:].tolist()):
            chunk = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if any_grad == 0:
                continue
            if p.grad is None:
                p.grad = chunk.to(p.device).clone()
            else:
                p.grad.copy_(chunk)


def reduce_mean(value: float | torch.Tensor, dist: Dist) -> float:
    """The mean of a scalar over ranks (for logging a loss); the value itself with one process."""
    value = float(value.detach().item() if isinstance(value, torch.Tensor) else value)
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.item() / dist.world_size


def decoder_layers(model: nn.Module, layer_classes: tuple[type, ...] | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of `layer_classes` (innermost first), else
    model.model.layers (Llama, Mistral, Qwen, ...) or model.transformer.h (GPT-2)."""
    if layer_classes:
        found = [m for m in reversed(list(model.modules())) if isinstance(m, layer_classes) and m is not model]
        if not found:
            names = ", ".join(c.__name__ for c in layer_classes)
            raise ValueError(f"no module of class {names} in {type(model).__name__}; pass the class of its "
                             "repeated decoder block as layer_classes")
        return found
    blocks = hf.decoder_layers(model)
    if blocks is not None:
        return blocks
    *paths, last = hf.DECODER_LAYER_PATHS
    raise ValueError(f"found no decoder layers in {type(model).__name__} (looked for {', '.join(paths)} and "
                     f"{last}); pass layer_classes=(YourBlockClass,) to say which modules to shard")


def shard_frozen_base(model: nn.Module, dist: Dist, layer_classes: tuple[type, ...] | None = None) -> None:
    """Shard the model over the ranks with FSDP2 (`fully_shard`): each decoder layer, then the root.

    Every parameter, frozen base and trainable adapter alike, is split into world_size shards (DTensors)
    and gathered per layer for forward and backward; FSDP2 allows frozen and trainable parameters in one
    unit and reduce-scatters (averages) only the trainable ones' gradients. So:
    - call broadcast_trainable first, and build the optimizer AFTER this (the parameters are replaced);
    - do not average gradients again; all_reduce_gradients skips these parameters;
    - buffers are not sharded (they are replicated on every rank): NF4 bases keep their packed 4-bit
      weights in buffers, so they stay whole on each rank;
    - to save the adapter, gather it with `p.full_tensor()` (on every rank; then save on the main one).
    With one process there is nothing to shard over and the model is left as it is.
    """
    layers = decoder_layers(model, layer_classes)  # fail on a model we cannot shard before anything changes
    if not dist.enabled:
        return
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:
        raise RuntimeError(f"shard_frozen_base needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                           f"this torch is {torch.__version__}: upgrade torch, or train data-parallel "
                           "without it") from err
    try:
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except Exception as err:
        raise RuntimeError(f"FSDP2 fully_shard failed on device type {dist.device.type!r} with torch "
                           f"{torch.__version__}: {err}. If this build cannot shard on CPU/gloo, run on GPUs: "
                           "`peftkit train --nproc N` (or torchrun) on a machine with N CUDA devices, which "
                           "uses nccl") from err


def reduce_max(value: float, dist: Dist) -> float:
    """The largest of a scalar over ranks (a flag any rank raised); the value itself with one process."""
    if not dist.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.item()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `peftkit <argv>` on `nproc` processes under torchrun on this machine; return its exit status.

    `argv` is the command line without the program name and already without `--nproc` (the children must
    not launch again). Each child calls init_distributed() to join the group.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    relaunch = [a for a in argv if a == "--nproc" or a.startswith("--nproc=")]
    if relaunch:
        raise ValueError(f"launch got {relaunch} in argv; strip --nproc before calling it, or every child "
                         "would launch again")
    # torchrun's own command-line parser would take peftkit's options for abbreviations of its own (--r is
    # "ambiguous" there), so use its launcher API: the children get `python -m peftkit.cli <argv>` verbatim.
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # on Ctrl-C / SIGTERM the launcher passes the signal on and waits shutdown_timeout seconds for the ranks to
    # finish their step and checkpoint (train/stop.py) before it kills them: torch's 30 s is short for a big model
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"peftkit-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          shutdown_timeout=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "peftkit.cli", *argv)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values() if f.exitcode]
        return codes[0] if codes else 1
    except SignalException as err:  # Ctrl-C or SIGTERM here: the launcher passed it on to the children (stop.py)
        return 128 + int(err.sigval)
    return 0
