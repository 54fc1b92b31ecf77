"""The memory set: FFN-input vectors on which new patches must stay silent."""

from __future__ import annotations

import torch

__all__ = ["MemorySet"]

CORPUS = -1  # owner code of rows that came from the memory corpus


class MemorySet:
    """A growable (N, d) matrix of FFN inputs, each row owned by the corpus or by one edit.

    Rows of an edit are removed again when that edit is rolled back.
    """

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device, capacity: int = 1024) -> None:
        self.d = d
        self._buf = torch.zeros(max(16, capacity), d, dtype=dtype, device=device)
        self._owner = torch.full((self._buf.shape[0],), CORPUS, dtype=torch.int64)
        self._n = 0
        # Running first and second moments (float64), kept in step with add/remove once asked for.
        self._sum: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> torch.Tensor:
        """(N, d) view of the rows."""
        return self._buf[: self._n]

    @property
    def owners(self) -> torch.Tensor:
        """(N,) owner code per row: -1 for the corpus, else an edit's code."""
        return self._owner[: self._n]

    def _grow(self, needed: int) -> None:
        if needed <= self._buf.shape[0]:
            return
        cap = max(needed, 2 * self._buf.shape[0])
        buf = self._buf.new_zeros(cap, self.d)
        buf[: self._n] = self._buf[: self._n]
        own = torch.full((cap,), CORPUS, dtype=torch.int64)
        own[: self._n] = self._owner[: self._n]
        self._buf, self._owner = buf, own

    @torch.no_grad()
    def add(self, vectors: torch.Tensor, owner: int = CORPUS) -> None:
        """Append rows (cast to the memory's dtype/device)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.d:
            raise ValueError(f"memory vectors must be (n, {self.d}), got {tuple(vectors.shape)}")
        n = vectors.shape[0]
        self._grow(self._n + n)
        self._buf[self._n : self._n + n] = vectors.to(self._buf.dtype)
        self._owner[self._n : self._n + n] = owner
        if self._sum is not None:
            v = self._buf[self._n : self._n + n].double()
            self._sum += v.sum(0)
            self._gram += v.t() @ v
        self._n += n

    @torch.no_grad()
    def remove_owner(self, owner: int) -> int:
        """Drop the rows of one owner; return how many."""
        keep = (self.owners != owner).nonzero().squeeze(1)
        dropped = self._n - keep.numel()
        if dropped and self._sum is not None:
            v = self.vectors[(self.owners == owner).to(self._buf.device)].double()
            self._sum -= v.sum(0)
            self._gram -= v.t() @ v
        if dropped:
            m = keep.numel()
            self._buf[:m] = self._buf.index_select(0, keep.to(self._buf.device))
            self._owner[:m] = self._owner.index_select(0, keep)
            self._n = m
        return dropped

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (d,) and covariance (d, d) of the rows, float64; updated incrementally."""
        if self._sum is None:
            v = self.vectors.double()
            self._sum, self._gram = v.sum(0), v.t() @ v
        n = max(self._n, 1)
        mean = self._sum / n
        return mean, self._gram / n - torch.outer(mean, mean)

    def num_corpus(self) -> int:
        """Rows that came from the memory corpus."""
        return int((self.owners == CORPUS).sum())

    def state(self) -> dict[str, torch.Tensor]:
        """The rows and their owners, for safetensors."""
        return {"vectors": self.vectors.contiguous().cpu(), "owners": self.owners.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore rows and owners saved by :meth:`state`."""
        v, o = state["vectors"], state["owners"]
        if v.dim() != 2 or v.shape[1] != self.d or o.shape != (v.shape[0],):
            raise ValueError(f"memory file holds vectors of shape {tuple(v.shape)}; this FFN needs (N, {self.d})")
        self._n = 0
        self._sum = self._gram = None
        self._grow(v.shape[0])
        self._buf[: v.shape[0]] = v.to(self._buf.device, self._buf.dtype)
        self._owner[: v.shape[0]] = o
        self._n = v.shape[0]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> "MemorySet":
        """Move the rows to another device or dtype."""
        self._buf = self._buf.to(device=device or self._buf.device, dtype=dtype or self._buf.dtype)
        self._sum = self._gram = None
        return self
