"""Tensor collectives on the training device, in one place.

NCCL accepts only tensors on the process's CUDA device, while gloo accepts CPU tensors: a tensor built
on the host passes every CPU test and fails on the first GPU step (`No backend type associated with
device type cpu`). Every tensor collective of the trainer goes through these helpers, which move their
input to `device` (the run's `env.device`) first. Object collectives (`all_gather_object`,
`broadcast_object_list`) choose their own device from the current CUDA device and are left as they are.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import torch
import torch.distributed as dist

SUM, MIN, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce(tensor: torch.Tensor, device: torch.device, op=SUM, group=None) -> torch.Tensor:
    """The reduction over all ranks (or `group`'s) of `tensor`, as a tensor on `device` (a copy when it was
    elsewhere; in place otherwise)."""
    tensor = tensor.to(device)
    if _distributed():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# Sequence parallelism's collectives (train/sequence_parallel.py): activations and latents, already on the
# device the model runs on, within one group.
def broadcast(tensor: torch.Tensor, src: int, group) -> None:
    dist.broadcast(tensor, src=src, group=group)


def all_to_all(out: torch.Tensor, tensor: torch.Tensor, output_split_sizes: List[int], input_split_sizes: List[int],
               group) -> None:
    """Rows of `tensor` (dim 0), input_split_sizes[j] of them to member j; `out` receives output_split_sizes[j]
    rows from member j, in member order."""
    dist.all_to_all_single(out, tensor, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes,
                           group=group)


def all_gather(parts: List[torch.Tensor], tensor: torch.Tensor, group) -> None:
    dist.all_gather(parts, tensor, group=group)


def all_reduce_values(values: Sequence[float], device: torch.device, op=SUM,
                      dtype: torch.dtype = torch.float64) -> List[float]:
    """Python numbers reduced elementwise over all ranks (one collective for the whole list)."""
    return all_reduce(torch.tensor(list(values), dtype=dtype, device=device), device, op).tolist()


def all_ranks_finite(loss: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Whether the loss is finite on every rank, as a one-element tensor on `device`: every rank must agree to skip
    a step, or the gradient all-reduce of the ranks that did not skip would wait forever. It stays on the device
    (no host read inside a micro-batch); the trainer reads it once, at the optimizer step's boundary."""
    return all_reduce(torch.isfinite(loss.detach()).reshape(1).float(), device, MIN) > 0


def sum_onto_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` becomes the sum of every rank's, in place (the others' are left as the reduction leaves
    them). The tensor must already be on the run's device."""
    if _distributed():
        dist.reduce(tensor, dst=0)
    return tensor
