"""Tensor-parallel sharding of patch neurons (pure PyTorch; no vLLM needed).

vLLM shards a Llama MLP the Megatron way: the input ``x`` is replicated on every rank, gate/up
are column-parallel (rank ``r`` holds a slice of the intermediate neurons) and down is
row-parallel (rank ``r`` multiplies its slice and produces a *partial* output; one all-reduce
sums the partials). Patch neurons are extra intermediate neurons with their own key, bias and
value, so they shard the same way: rank ``r`` holds a contiguous slice of the patches and adds

    act(x K_r^T + b_r) V_r

to its partial down-projection output before the all-reduce. Because the patches' hidden units
are independent of each other, the sum over ranks of these partials is exactly the full patch
output; the layer keeps its single all-reduce, and each rank stores ~1/tp of the patch bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...kernels.patch_forward import patch_forward

__all__ = ["shard_range", "shard_patches", "PatchSet", "empty_patch_set", "patch_partial"]


def shard_range(num_patches: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the patches that rank ``rank`` of ``world_size`` holds.

    Contiguous and balanced: the first ``num_patches % world_size`` ranks hold one more patch.
    Ranks beyond the patch count hold an empty slice (and add nothing).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_patches < 0:
        raise ValueError(f"num_patches must be >= 0, got {num_patches}")
    base, extra = divmod(num_patches, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_patches(
    keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of the patches: keys (p, d_in), biases (p,), values (p, d_out),
    contiguous copies (so the full tensors can be freed)."""
    n = keys.shape[0]
    if biases.shape != (n,) or values.shape[0] != n:
        raise ValueError(
            f"keys, biases and values disagree on the patch count: {tuple(keys.shape)}, "
            f"{tuple(biases.shape)}, {tuple(values.shape)}"
        )
    s, e = shard_range(n, rank, world_size)
    return keys[s:e].contiguous(), biases[s:e].contiguous(), values[s:e].contiguous()


@dataclass(frozen=True)
class PatchSet:
    """One rank's fully built, immutable slice of a layer's patches.

    A hot update builds a new ``PatchSet`` beside the live one and then swaps a single reference,
    so a forward pass sees one set or the other, never a half-written one.

    Attributes:
        keys / biases / values: this rank's slice (dtype and device of the served MLP).
        act: activation code (``fastpatch.kernels.reference.ACT_*``).
        total: patches in the whole set (all ranks).
        module_path: the FFN the patches belong to (``model.layers.N.mlp``).
        source: where the set came from (a file path, or ``""`` for the empty set).
        meta: the patch file's metadata (records, fingerprint, ...), for status reports.
    """

    keys: torch.Tensor
    biases: torch.Tensor
    values: torch.Tensor
    act: int
    total: int
    module_path: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def local(self) -> int:
        """Patches held by this rank."""
        return self.keys.shape[0]

    def nbytes(self) -> int:
        """Bytes of this rank's patch tensors."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.biases, self.values))


def empty_patch_set(module_path: str, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str,
                    act: int = 0) -> PatchSet:
    """A set with no patches (the layer then computes exactly the original MLP)."""
    return PatchSet(
        torch.zeros(0, d_in, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device),
        torch.zeros(0, d_out, dtype=dtype, device=device), act, 0, module_path,
    )


def patch_partial(x: torch.Tensor, base: torch.Tensor, patches: PatchSet | None) -> torch.Tensor:
    """``base + act(x K_r^T + b_r) V_r`` for this rank's slice (a new tensor; inputs untouched).

    ``x`` (..., d_in) is the MLP input, ``base`` (..., d_out) the rank's partial down-projection
    output. fastpatch's kernels compute it: Triton on CUDA, PyTorch on the CPU. With no local
    patches the result is ``base`` bit for bit.
    """
    if patches is None or patches.local == 0:
        return base.clone()
    d_out = base.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != patches.keys.dtype:
        x2 = x2.to(patches.keys.dtype)
    base2 = base.reshape(-1, d_out)
    out = patch_forward(x2, patches.keys, patches.biases, patches.values, base2.to(patches.keys.dtype), patches.act)
    return out.to(base.dtype).reshape(base.shape)
