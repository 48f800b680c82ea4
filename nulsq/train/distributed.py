"""DDP plumbing, initialised from the launcher's environment.

torchrun (one node or many) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a
SLURM job started by Hydra's submitit launcher with several tasks sets SLURM_* instead, which are
translated here. Without either, everything in this file is a single-process no-op, so the same
code path runs a laptop CPU job and a multi-node GPU job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nulsq.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Args:
        rank: global rank (0 writes every run file).
        world_size: number of processes in the job.
        local_rank: index of this process's GPU on its node (LOCAL_RANK; 0 when the launcher
            already shows each process only its own GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_submitit_env() -> None:
    """Under a multi-task submitit SLURM job, set the torchrun variables from SLURM's.

    Only when submitit launched us (SUBMITIT_EXECUTOR=slurm): a plain `python train.py` inside an
    sbatch script also sees SLURM_NTASKS, and must not wait for tasks that do not exist.
    """
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Keep CUDA_VISIBLE_DEVICES: every task sees the node's GPUs and picks LOCAL_RANK's.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _device_index(local_rank: int) -> int:
    """The CUDA device of this process: LOCAL_RANK's, or 0 when only one GPU is visible."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0  # the launcher bound one GPU per process (e.g. SLURM --gpus-per-task=1)
    if local_rank >= count:
        raise UserError(
            f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible; launch at most "
            f"{count} processes per node (torchrun --nproc_per_node={count})"
        )
    return local_rank


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group the launcher set up (NCCL on CUDA, gloo on CPU); no-op when not
    launched by torchrun or a multi-task submitit job.

    Args:
        device_type: "cuda" or "cpu", the device the run computes on.
    """
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        local_rank = _device_index(local_rank)
    info = DistInfo(int(os.environ["RANK"]), world, local_rank)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def check_sync_bn(sync_bn: bool, device_type: str, info: DistInfo) -> None:
    """trainer.sync_bn only means something under DDP, and torch's SyncBatchNorm is GPU-only."""
    if sync_bn and info.enabled and device_type != "cuda":
        raise UserError(
            "trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on CPU); "
            "set trainer.sync_bn=false for a CPU run"
        )


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's `t` (same shape on every rank) concatenated along dim 0, in rank order."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class GlobalBatches:
    """A train loader seen as global batches: each rank's slice gathered from every rank.

    Step-size initialisation must see what a single process would see with the same global
    batch (its statistics are not linear in the batch: MSE init takes a max over batches), so
    under DDP every rank observes the gathered global batch. Re-iterable, like the loader.

    Args:
        loader: this rank's train loader (equal batch shapes on every rank).
        info: the job's DistInfo.
    """

    def __init__(self, loader, info: DistInfo) -> None:
        self.loader, self.info = loader, info

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield all_gather_cat(images, self.info), all_gather_cat(labels, self.info)


def broadcast_state(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (after step-size initialisation)."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so that all ranks
    evaluate the network the checkpoint holds."""
    if not info.enabled:
        return
    for t in module.buffers():
        dist.broadcast(t.data, src=0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without DDP)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
