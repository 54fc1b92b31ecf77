"""The handle every piece of the editor shares: the model, its tokenizer, adapter, patched FFN and
task, and whether the fast path is on (decided once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..patched_ffn import PatchedFFN
from .adapters import FamilyAdapter
from .encoding import TaskEncoder, encoder_for
from .types import EditError

__all__ = ["ModelHandle"]


@dataclass
class ModelHandle:
    """What the editor's pieces (encoding, capture, init, objective, training) work on.

    Attributes:
        model: the Hugging Face model (eval mode).
        tokenizer: its tokenizer.
        adapter: the family adapter (where the FFN and the tail are; the task).
        ffn: the patched FFN.
        fast: the fast path is on: ``config.fast_path`` and the adapter has a tail.
        tail_module: the module whose input is the tail input ``s0`` (None without a tail).
    """

    model: nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    ffn: PatchedFFN
    fast: bool
    tail_module: nn.Module | None

    @property
    def device(self) -> torch.device:
        """Where the patched FFN's weights (and every input built here) live."""
        return self.ffn.layout.w_up.device

    @property
    def task(self) -> str:
        """``causal``, ``seq2seq``, ``mlm`` or ``cls``."""
        return self.adapter.task

    @property
    def encoder(self) -> TaskEncoder:
        """The task's encoder."""
        return encoder_for(self.adapter.task)

    def max_len(self) -> int:
        """The model's context length (a very large number when it does not say)."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", 0)
        return v if 0 < v < 1_000_000 else 1 << 30

    def check_len(self, n: int) -> None:
        """Raise ``EditError`` for a request of ``n`` tokens longer than the context."""
        if n > self.max_len():
            raise EditError(f"request of {n} tokens is longer than the model's context ({self.max_len()})")

    def to_dev(self, enc: Any) -> dict[str, torch.Tensor]:
        """A tokenizer's output as model inputs on the device."""
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's scoring forward (no key/value cache)."""
        return self.encoder.forward(self, inputs)
