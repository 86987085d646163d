"""One run on several processes: what the loop needs so that every rank stays in step.

The engine is PyTorch distributed through accelerate, never anything home-made:

- ``ddp`` (default): every process holds the whole model and sees its share of each step's micro-batches;
  gradients are averaged across processes in backward (DistributedDataParallel).
- ``fsdp``: FSDP2 full sharding (``torch.distributed.fsdp.fully_shard`` through accelerate's
  FullyShardedDataParallelPlugin): weights, gradients and optimizer state are split across processes.

The launchers (``tunesmith train --nproc``, ``torchrun``, ``accelerate launch``, SLURM) only start the
processes; see launch.py. One process ignores all of this.

A collective that one rank skips hangs every other rank, so the loop keeps three rules:

1. every rank runs the same number of forward/backward passes per step and per evaluation; a rank with
   no data left runs a pass that carries no loss (``steps.no_loss``);
2. every decision (skip a step, stop, best, early stopping, checkpoint) is taken on values that all ranks
   hold equally: all-reduced sums (identical on every rank by construction of all-reduce) or ``any_rank``;
3. under FSDP, gathering full tensors (checkpoints, best weights, the delivered model) is done by all
   ranks together (``gather_full``); only the main process writes files.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import Config, ConfigError
from . import checkpoint as ckpt


def strategy(cfg: Config) -> str:
    """``ddp`` or ``fsdp``: the config's choice, or FSDP when the launcher's accelerate config turns it on."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return cfg.distributed.strategy


def build_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this process: DDP, or FSDP2 when ``strategy`` says so and there are several processes."""
    cpu = not torch.cuda.is_available()
    mixed_precision = accelerate_mixed_precision(cfg)
    if strategy(cfg) != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    if cfg.method.name != "full":
        raise ConfigError(f"FSDP (distributed.strategy fsdp, or an accelerate config with FSDP) shards full "
                          f"fine-tuning only, and method.name is {cfg.method.name!r}: use method.name=full, or "
                          f"distributed.strategy=ddp (a LoRA adapter or a few unfrozen blocks gain nothing from sharding)")
    # FSDP2, each decoder block its own shard group; fields not set here come from the launcher's
    # accelerate config (FSDP_* environment variables), e.g. fsdp_cpu_ram_efficient_loading.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate 1.15 turns FSDP on only for accelerator devices (AcceleratorState keeps MULTI_CPU and
        # drops the plugin), although torch's FSDP2 runs on CPU over gloo. Turn it on as accelerate does on
        # GPUs, so that CPU runs, and the tests, take the very code path GPU runs take. PartialState too:
        # every later AcceleratorState() copies its distributed_type over the Accelerator's.
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def accelerate_mixed_precision(cfg: Config) -> str:
    """accelerate's mixed_precision: "fp16" where the run trains in float16 on a GPU (accelerate's loss scaler), else
    "no": bf16 autocast is applied by the training passes themselves (steps.Compute), once the precision is chosen."""
    from .. import models

    if not torch.cuda.is_available():
        return "no"
    return "fp16" if models.select_precision(cfg.model.dtype, "cuda").name == "float16" else "no"


def main_process_choice(accelerator: Accelerator, value):
    """``value`` as the main process computed it, on every process (a decision taken from a measurement, which could
    come out differently on each process, must be the same on all of them)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective when there are several)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def every_rank(accelerator: Accelerator, flag: bool) -> bool:
    return not any_rank(accelerator, not flag)


def sum_over_ranks(accelerator: Accelerator, loss_sum: float, stats: dict[str, float]) -> tuple[float, dict[str, float]]:
    """A step's summed loss and statistics added over every rank (one collective; fp32, as the loss was always
    reduced)."""
    t = torch.tensor([loss_sum, *stats.values()], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum").tolist()
    return t[0], dict(zip(stats, t[1:]))


def gather_full(tensors: dict, keep: bool) -> dict | None:
    """Full CPU copies of tensors that may be FSDP shards.

    Gathering is a collective under FSDP, so every rank calls this, one tensor at a time in the same order;
    only ranks with ``keep`` hold the result (others get None and free each gathered tensor at once).
    Plain tensors are copied to CPU by the ranks that keep them and cost nothing elsewhere.
    """
    out = {} if keep else None
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().to("cpu", copy=True).contiguous() if torch.is_tensor(full) else full
    return out


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor read from disk) laid out like ``target``: this rank's shard when ``target`` is
    an FSDP DTensor (every rank read the same file, so each cuts its own piece: no communication)."""
    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                 target.placements, src_data_rank=None)
    return value


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """This rank's copy of the trainable weights (the best-so-far): CPU copies, or under FSDP copies of this
    rank's shards, which stay where they are (a full copy per process would undo the sharding)."""
    if not is_sharded(accelerator):
        return ckpt.trainable_state(model)
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def shard_like(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Full tensors (e.g. best.safetensors) cut to this rank's shards of ``model``'s parameters."""
    params = trainable(model)
    return {n: like(t, params[n]) if n in params else t for n, t in tensors.items()}


# ---------------------------------------------------------------- checkpoints of a sharded model
#
# checkpoint.py reads ``named_parameters()`` and ``state_dict()`` from the model and optimizer it saves,
# and writes through ``param.copy_`` and ``optimizer.load_state_dict`` when it loads. Under FSDP those
# hold shards; the stand-ins below hold full tensors instead, so a sharded run writes (gathered on the
# main process) and reads the very format a one-process run does, and resumes on any number of processes.


class _FullModel:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return ((n, torch.nn.Parameter(t)) for n, t in self.tensors.items())  # shares storage with ``tensors``


class _FullOptimizer:
    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class _ShardingOptimizer:
    """Loads a full optimizer state into an optimizer over sharded parameters."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(optimizer_state_like(sd, self.optimizer))


def save_checkpoint(ckpt_root, model, optimizer, scheduler, state, keep_last: int, accelerator: Accelerator,
                    extra: dict | None = None):
    """checkpoint.save_checkpoint on the main process, after every rank helped gather the shards under FSDP.
    Every rank calls it; returns the checkpoint path on the main process, None elsewhere."""
    main = accelerator.is_main_process
    if is_sharded(accelerator):
        model, optimizer = _FullModel(gather_full(trainable(model), main)), \
            _FullOptimizer(full_optimizer_state(optimizer, main))
    return ckpt.save_checkpoint(ckpt_root, model, optimizer, scheduler, state, keep_last, extra) if main else None


def load_checkpoint(path, model, optimizer, scheduler, accelerator: Accelerator):
    """checkpoint.load_checkpoint on every rank; under FSDP each rank reads the full tensors and keeps its shards."""
    if not is_sharded(accelerator):
        return ckpt.load_checkpoint(path, model, optimizer, scheduler)
    params = trainable(model)
    full = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()}
    state = ckpt.load_checkpoint(path, _FullModel(full), _ShardingOptimizer(optimizer), scheduler)
    with torch.no_grad():
        for n, t in full.items():
            params[n].copy_(like(t, params[n]))
    return state


def full_optimizer_state(optimizer, keep: bool) -> dict | None:
    """``optimizer.state_dict()`` with FSDP-sharded moments gathered: the format a one-process run writes.
    A collective under FSDP (every rank calls it); only ranks with ``keep`` get the result."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        gathered = gather_full(sd["state"][idx], keep)
        if keep:
            state[idx] = gathered
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def optimizer_state_like(sd: dict, optimizer) -> dict:
    """A full optimizer state dict (see ``full_optimizer_state``) with each moment cut to this rank's shard
    of its parameter; unchanged when nothing is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's index order
    if not any(isinstance(p, DTensor) for p in params):
        return sd
    state = {idx: {k: like(v, params[idx]) if torch.is_tensor(v) and v.shape == params[idx].shape else v
                   for k, v in s.items()} for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}
