"""vLLM model classes that serve Llama-family models with fastpatch patch neurons (imports vLLM).

``FastpatchLlamaForCausalLM`` (and the Qwen2 / Mistral twins) is vLLM's own class plus, after
vLLM has loaded the checkpoint, a ``PatchedMLP`` in place of the MLP of each patched layer:

    partial = mlp(x)                  # vLLM's MLP with its down projection left un-reduced
    out = partial + act(x K_r^T + b_r) V_r   # this rank's patch slice (fastpatch kernels)
    out = all_reduce(out)             # the layer's single all-reduce (only when TP > 1)

Configuration comes from the Hugging Face config, set with ``hf_overrides``
(``plugin.llm_kwargs`` builds it):

- ``fastpatch_patches``: patch files to serve from the start (a path or a list);
- ``fastpatch_layers``: layers that can be patched (indices, negative allowed, or module paths
  ``model.layers.N.mlp``); default: the layers of the start files, else the last layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ...bank import PatchFileError
from .ops import new_slot
from .patchfile import ServedFFN, layer_path, served_ffn
from .state import PatchState

__all__ = ["PatchedMLP", "FastpatchLlamaForCausalLM", "FastpatchQwen2ForCausalLM", "FastpatchMistralForCausalLM"]

_PROJ = ("gate_proj", "up_proj", "down_proj")


class PatchedMLP(nn.Module):
    """A vLLM MLP plus this rank's patch neurons, with the all-reduce after the patches.

    The wrapped MLP's down projection is switched to ``reduce_results=False`` so that it returns
    this rank's partial sum; the patches' partial joins it and one all-reduce follows, as the
    unpatched layer does. No tensors are registered here: the patches live in an op slot.
    """

    def __init__(self, mlp: nn.Module, module_path: str, slot: int) -> None:
        super().__init__()
        down = getattr(mlp, "down_proj", None)
        if down is None or not hasattr(down, "reduce_results"):
            raise TypeError(f"{module_path}: {type(mlp).__name__} has no row-parallel down_proj to patch")
        self.mlp = mlp
        self.module_path = module_path
        self.slot = slot
        self.tp_size = int(getattr(down, "tp_size", 1))
        down.reduce_results = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.mlp(x)
        out = torch.ops.fastpatch.vllm_patch_add(x, partial, self.slot)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return f"path={self.module_path!r}, slot={self.slot}, tp_size={self.tp_size}"


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _file_module_path(path: str) -> str:
    """The module path in a patch file's metadata (header only; the file is checked fully later)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise PatchFileError(f"patch file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("module_path", "")
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise PatchFileError(f"{path} is not a readable safetensors file: {e}") from e


def _layer_index(spec: Any, n_layers: int) -> int:
    """Layer index of ``spec`` (an int, negative allowed, or ``model.layers.N.mlp``)."""
    if isinstance(spec, str):
        parts = spec.split(".")
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] != "mlp" or not parts[2].lstrip("-").isdigit():
            raise ValueError(f"fastpatch layer {spec!r} is not 'model.layers.<N>.mlp' (the Llama-family MLP path)")
        spec = parts[2]
    i = int(spec)
    if not -n_layers <= i < n_layers:
        raise ValueError(f"fastpatch layer {spec} is out of range for a model of {n_layers} layers")
    return i % n_layers


class FastpatchMixin:
    """Adds fastpatch's patched MLPs to a vLLM Llama-family ``*ForCausalLM`` (after weights load)."""

    fastpatch: PatchState

    def _fastpatch_layers(self, files: list[str]) -> list[int]:
        cfg = self.config  # type: ignore[attr-defined]
        n = int(cfg.num_hidden_layers)
        specs = _as_list(getattr(cfg, "fastpatch_layers", None)) or [_file_module_path(f) for f in files] or [-1]
        return sorted({_layer_index(s, n) for s in specs})

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, while recording the patched layers' checkpoint FFN tensors (for the
        fingerprint), then the patched MLPs and the start patch files."""
        cfg = self.config  # type: ignore[attr-defined]
        files = [str(p) for p in _as_list(getattr(cfg, "fastpatch_patches", None))]
        layers = self._fastpatch_layers(files)
        wanted = {f"{layer_path(i)}.{p}.weight": (layer_path(i), p) for i in layers for p in _PROJ}
        seen: dict[str, dict[str, torch.Tensor]] = {layer_path(i): {} for i in layers}
        idents: dict[str, ServedFFN] = {}
        dtype = next(self.parameters()).dtype  # type: ignore[attr-defined]
        d = int(cfg.hidden_size)

        def tap(it: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in it:
                hit = wanted.get(name)
                if hit is not None:
                    mp, proj = hit
                    seen[mp][proj] = t
                    if len(seen[mp]) == 3:  # hash now, keep no checkpoint tensor alive
                        got = seen.pop(mp)
                        idents[mp] = served_ffn(mp, dtype, *(got[p] for p in _PROJ), d, d)
                yield name, t

        loaded = super().load_weights(tap(weights))  # type: ignore[misc]
        for mp in seen:  # layers whose tensors came under other names: fingerprint unknown
            idents[mp] = served_ffn(mp, dtype, None, None, None, d, d)
        slots = {}
        device = torch.device("cpu")
        for i in layers:
            mp = layer_path(i)
            layer = self.model.layers[i]  # type: ignore[attr-defined]
            slot = new_slot()
            layer.mlp = PatchedMLP(layer.mlp, mp, slot.ident)
            slots[mp] = slot
            device = layer.mlp.mlp.down_proj.weight.device
            rank, world = int(layer.mlp.mlp.down_proj.tp_rank), layer.mlp.tp_size
        self.fastpatch = PatchState(idents, slots, rank, world, device)
        if files:
            self.fastpatch.stage("startup", files)
            self.fastpatch.commit("startup")
            self.fastpatch.history.clear()  # the start state is the base of rollbacks
        return loaded


class FastpatchLlamaForCausalLM(FastpatchMixin, LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` (Llama, SmolLM2, ...) with fastpatch patch neurons."""


class FastpatchQwen2ForCausalLM(FastpatchMixin, Qwen2ForCausalLM):
    """vLLM's ``Qwen2ForCausalLM`` with fastpatch patch neurons."""


class FastpatchMistralForCausalLM(FastpatchMixin, MistralForCausalLM):
    """vLLM's ``MistralForCausalLM`` with fastpatch patch neurons."""
