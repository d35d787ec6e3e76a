"""How the processes of a `torchrun` run share the model: `--parallel ddp` (the default: a full replica per process,
gradients all-reduced) or `--parallel fsdp` (PyTorch's FSDP2, `fully_shard`: weights, gradients and optimizer state
sharded over the processes, one all-gather per decoder layer). A single process runs the plain model either way.

    FSDP      each decoder layer is one shard unit, the rest of the language model and the projector the root unit; the
              frozen vision tower is replicated (ignored by FSDP). On a GPU the gathered weights and the forward run in
              the compute dtype (bf16), gradients are reduced and the optimizer steps in fp32 (the master weights).
              Activation checkpointing (--grad-checkpointing) is applied to the layers before they are sharded.
    saving    the weights are gathered into one ordinary model folder (the main process writes it: `chat`, `eval`
              and `--from-weight` read it as any other); the optimizer state is saved sharded with distributed
              checkpointing (torch.distributed.checkpoint), which a resume with another number of processes - one
              included - re-shards on load.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from .args import PARALLEL_MODES



class Parallel:
    """The run's choice (`mode`) over `world` processes; `sharded`: whether weights live in shards (FSDP, world > 1)."""

    def __init__(self, mode: str, world: int, device: torch.device, dtype: torch.dtype, evaluates: bool = False):
        """`evaluates`: the main process will evaluate the model during the run (--eval-every)."""
        if mode not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
        if mode == "fsdp" and dtype == torch.float16:
            raise ValueError("--parallel fsdp trains in bf16 or fp32 (fp16 would need a sharded gradient scaler): "
                             "pass --dtype bf16 (or fp32)")
        self.mode, self.world, self.device, self.dtype = mode, world, device, dtype
        self.sharded = mode == "fsdp" and world > 1
        if self.sharded and evaluates:  # the main process alone cannot run a model whose weights are in shards
            raise ValueError("--eval-every with --parallel fsdp over several processes is not supported: score the "
                             "checkpoints' model folders with `minimind-v eval` instead")
        self.saved_keys: list[str] = []
        self.trained: list[nn.Parameter] | None = None  # the weights clip() looks at, listed at its first call

    def place(self, model: nn.Module) -> None:
        """Put the model on the device; sharded, only the replicated tower (fully_shard moves each unit itself, so
        the whole model never sits on one GPU)."""
        if not self.sharded:
            model.to(self.device)
        elif model.vision_tower is not None:
            model.vision_tower.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP over the processes (the model itself in one process). Call after freezing: what a checkpoint
        saves is recorded here."""
        self.saved_keys = list(model.checkpoint_state_dict())
        if self.world == 1:
            return model
        if self.sharded:
            return shard(model, self.device, self.dtype)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def without_sync(self, wrapped: nn.Module):
        """A context in which backward passes accumulate gradients without communicating (all but the last
        micro-batch of a step)."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            return _no_gradient_sync(wrapped)
        return wrapped.no_sync()

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the trained weights' gradient norm -> the norm before clipping (a plain tensor). The weights are
        listed once (walking every module of the model each step costs a small model's step ~2 ms of host time)."""
        if self.trained is None:
            self.trained = [p for p in model.parameters() if p.requires_grad]
        norm = nn.utils.clip_grad_norm_(self.trained, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every process calls this when sharded: the checkpoint's weights gathered on the CPU of the main process
        (None elsewhere, and when the model is whole: it saves itself)."""
        if not self.sharded:
            return None
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {key: state[key] for key in self.saved_keys} if state else None

    def save_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
        """The optimizer state, each process writing its shards into `folder` (every process calls this)."""
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved) -> None:
        """Restore the optimizer from a sharded folder (any number of processes wrote it) or a whole state dict."""
        if isinstance(saved, str):
            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=saved, no_dist=not dist.is_initialized())
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        elif self.sharded:  # a whole state dict (a run without FSDP wrote it), keyed by parameter numbers
            set_optimizer_state_dict(model, optimizer, by_name(saved, optimizer, model),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def shard(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """FSDP2 in place: one unit per decoder layer, then the root (the tower's weights ignored: replicated)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
    for layer in model.decoder_layers():
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    tower = set(model.vision_tower.parameters()) if model.vision_tower is not None else set()
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=tower)
    return model


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def by_name(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A whole optimizer state dict keyed by parameter numbers -> keyed by parameter names (what the distributed
    state-dict functions read), matching the numbers through the optimizer's own groups (the same order)."""
    names = {id(param): name for name, param in model.named_parameters()}
    number_to_name = {}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for number, param in zip(saved_group["params"], group["params"], strict=True):
            number_to_name[number] = names[id(param)]
    groups = [{**g, "params": [number_to_name[n] for n in g["params"]]} for g in saved["param_groups"]]
    return {"state": {number_to_name[n]: s for n, s in saved["state"].items()}, "param_groups": groups}

