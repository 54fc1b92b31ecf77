"""The patch state of one serving process (one tensor-parallel rank): which ``PatchSet`` each
patched layer serves, staged updates, and the history that rollback pops (pure PyTorch).

Updates are two-phase so that all ranks change together or none does:

1. ``stage(token, paths)`` reads and validates every file and builds this rank's new sets beside
   the live ones (nothing served changes; any error is reported and nothing is kept);
2. ``commit(token)`` (only once every rank staged without error) pushes the live state onto the
   history and points every slot at its new set: plain reference assignments, which cannot fail
   half-way, executed between two model steps.

``discard(token)`` drops a staged update; ``rollback()`` restores the state before the last
commit. Each commit keeps the previous state's tensors alive for rollback (``max_history``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ...bank import PatchFileError
from .ops import PatchSlot
from .patchfile import ServedFFN, build_patch_set, read_patch_file
from .sharding import PatchSet, empty_patch_set

__all__ = ["PatchState"]

State = dict[str, PatchSet]


class PatchState:
    """Patch sets of the patched layers in this process.

    Args:
        served: identity of each patched MLP, by module path (``model.layers.N.mlp``).
        slots: the op slot of each patched MLP, by module path.
        rank / world_size: this process's tensor-parallel rank and the TP size.
        device: where the patch tensors live (the MLP's device).
        max_history: committed states kept for rollback (oldest dropped first).
    """

    def __init__(
        self, served: dict[str, ServedFFN], slots: dict[str, PatchSlot], rank: int, world_size: int,
        device: torch.device | str, max_history: int = 8,
    ) -> None:
        if set(served) != set(slots):
            raise ValueError(f"served layers {sorted(served)} and slots {sorted(slots)} differ")
        self.served, self.slots = served, slots
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.max_history = max_history
        self.history: list[State] = []
        self._staged: dict[str, State] = {}
        for mp, slot in slots.items():
            if slot.current is None:
                f = served[mp]
                slot.current = empty_patch_set(mp, f.d_in, f.d_out, f.dtype, self.device)

    def live(self) -> State:
        """The sets served now, by module path."""
        return {mp: slot.current for mp, slot in self.slots.items()}  # type: ignore[misc]

    def stage(self, token: str, paths: Sequence[str | os.PathLike], clear: bool = False) -> dict[str, Any]:
        """Build (not serve) the state with each file's patches replacing its layer's set; with
        ``clear``, every layer not named by a file gets the empty set. Two files for one layer
        are refused. Returns a summary of the staged state (see :meth:`describe`).

        Raises:
            PatchFileError: a file that does not fit the served model (nothing is staged).
        """
        new = {mp: s for mp, s in self.live().items()}
        if clear:
            for mp, f in self.served.items():
                new[mp] = empty_patch_set(mp, f.d_in, f.d_out, f.dtype, self.device)
        taken: dict[str, str] = {}
        for p in paths:
            tensors, meta, ffn = read_patch_file(p, self.served)
            if ffn.module_path in taken:
                raise PatchFileError(f"{p} and {taken[ffn.module_path]} both patch {ffn.module_path}")
            taken[ffn.module_path] = str(p)
            new[ffn.module_path] = build_patch_set(tensors, meta, ffn, self.rank, self.world_size, self.device, str(p))
        self._staged[token] = new
        return self.describe(new)

    def commit(self, token: str) -> dict[str, Any]:
        """Serve the staged state ``token``; the live one goes onto the history."""
        try:
            new = self._staged.pop(token)
        except KeyError:
            raise KeyError(f"no staged patch update {token!r} on rank {self.rank}") from None
        self.history.append(self.live())
        del self.history[: -self.max_history]
        self._install(new)
        return self.describe(new)

    def discard(self, token: str) -> None:
        """Drop a staged update (no error if there is none)."""
        self._staged.pop(token, None)

    def rollback(self) -> dict[str, Any]:
        """Serve the state before the last commit again.

        Raises:
            RuntimeError: nothing to roll back to.
        """
        if not self.history:
            raise RuntimeError("no earlier patch state to roll back to")
        prev = self.history.pop()
        self._install(prev)
        return self.describe(prev)

    def _install(self, state: State) -> None:
        for mp, slot in self.slots.items():
            slot.current = state[mp]  # one reference assignment per layer

    def describe(self, state: State | None = None) -> dict[str, Any]:
        """Per layer: patches in total, on this rank, this rank's bytes and the source file."""
        state = self.live() if state is None else state
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "history": len(self.history),
            "layers": {
                mp: {"total": s.total, "local": s.local, "bytes": s.nbytes(), "source": s.source}
                for mp, s in sorted(state.items())
            },
        }
