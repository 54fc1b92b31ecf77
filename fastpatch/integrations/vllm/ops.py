"""The patch addition as one opaque PyTorch custom op, and the slots it reads patch sets from.

``torch.ops.fastpatch.vllm_patch_add(x, base, slot)`` returns ``base + act(x K^T + b) V`` for the
``PatchSet`` currently installed in ``slot`` (one slot per patched layer and process). Two reasons
for an op rather than inline code in the MLP's forward:

- ``torch.compile`` (vLLM compiles the model and drops its guards) sees a black box with a fixed
  output shape: the data-dependent work inside (ReLU sparsity, the patch count) never becomes part
  of a compiled graph, and a hot update that changes the number of patches needs no recompilation.
- The patch tensors are not module attributes: vLLM's weight loader never sees them, and a hot
  update replaces the slot's reference to a fully built ``PatchSet`` in one assignment, between two
  model steps, so a forward pass reads the old set or the new one, never a mix.

Importing this module registers the op (needs only PyTorch >= 2.4).
"""

from __future__ import annotations

import itertools
import threading

import torch

from .sharding import PatchSet, patch_partial

__all__ = ["PatchSlot", "new_slot", "get_slot", "drop_slot", "patch_add"]


class PatchSlot:
    """Holds the live ``PatchSet`` of one patched layer in this process (``current``)."""

    def __init__(self, ident: int, current: PatchSet | None = None) -> None:
        self.ident = ident
        self.current = current

    def __repr__(self) -> str:
        n = 0 if self.current is None else self.current.total
        return f"PatchSlot({self.ident}, patches={n})"


_SLOTS: dict[int, PatchSlot] = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


def new_slot(initial: PatchSet | None = None) -> PatchSlot:
    """Allocate a slot (one per patched layer; the id goes into the compiled graph as a constant)."""
    with _LOCK:
        slot = PatchSlot(next(_IDS), initial)
        _SLOTS[slot.ident] = slot
    return slot


def get_slot(ident: int) -> PatchSlot:
    """The slot with id ``ident``; raises ``KeyError`` naming it if it was dropped."""
    try:
        return _SLOTS[ident]
    except KeyError:
        raise KeyError(f"fastpatch: no patch slot {ident} in this process") from None


def drop_slot(ident: int) -> None:
    """Forget a slot (its layer is gone)."""
    with _LOCK:
        _SLOTS.pop(ident, None)


@torch.library.custom_op("fastpatch::vllm_patch_add", mutates_args=())
def patch_add(x: torch.Tensor, base: torch.Tensor, slot: int) -> torch.Tensor:
    """``base + act(x K^T + b) V`` with the patch set installed in ``slot`` (a new tensor).

    ``x`` (tokens, d_in) is the MLP input, ``base`` (tokens, d_out) the (partial) MLP output.
    """
    # One read of the reference: the whole call uses one patch set even if another thread swaps.
    return patch_partial(x, base, get_slot(slot).current)


@patch_add.register_fake
def _patch_add_fake(x: torch.Tensor, base: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(base)
