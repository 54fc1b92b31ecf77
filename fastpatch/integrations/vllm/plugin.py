"""The vLLM plugin entry point and the ``LLM(...)`` arguments that serve a patched model.

``register`` is the ``vllm.general_plugins`` entry point (pyproject): vLLM calls it in every
process it starts; it registers fastpatch's architectures by name (the string form defers
importing vLLM's model code until a model is built).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .hot_update import WORKER_EXTENSION

__all__ = ["ARCHITECTURES", "register", "llm_kwargs"]

#: Hugging Face architecture -> fastpatch's vLLM architecture that serves it with patches.
ARCHITECTURES = {
    "LlamaForCausalLM": "FastpatchLlamaForCausalLM",
    "Qwen2ForCausalLM": "FastpatchQwen2ForCausalLM",
    "MistralForCausalLM": "FastpatchMistralForCausalLM",
}

_MODULE = "fastpatch.integrations.vllm.model"


def register() -> None:
    """Register fastpatch's architectures with vLLM's ``ModelRegistry`` (idempotent)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for name in ARCHITECTURES.values():
        if name not in known:
            ModelRegistry.register_model(name, f"{_MODULE}:{name}")


def _check_start_files(model: Path, files: list[str]) -> None:
    """Read each file's metadata and check it against that layer's tensors in ``model``."""
    from ...bank import PatchBank
    from .patchfile import checkpoint_ffn, read_patch_file

    for f in files:
        _, meta = PatchBank.read_file(f)
        mp = meta.get("module_path", "")
        read_patch_file(f, {mp: checkpoint_ffn(model, mp)})


def llm_kwargs(
    model: str | os.PathLike,
    patches: Sequence[str | os.PathLike] | str | os.PathLike = (),
    layers: Sequence[int | str] | None = None,
    hf_overrides: dict[str, Any] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Arguments for ``vllm.LLM`` that serve ``model`` (a Hugging Face directory) with patches.

    Args:
        model: the model directory (its ``config.json`` names the architecture).
        patches: patch files (``PatchedFFN.save`` / ``Editor.save``'s ``patches.safetensors``)
            served from the start; they are checked against the loaded weights.
        layers: layers that can be patched, now or by a later hot update (indices or
            ``model.layers.N.mlp``); default: those of ``patches``, else the last layer.
        hf_overrides: more config overrides to merge.
        check: check each start file against the checkpoint on disk now, so that a wrong file
            fails here with its reason instead of inside the engine's worker processes (which
            check it again once they have loaded the weights).

    Returns:
        ``{"model", "hf_overrides", "worker_extension_cls"}``; pass the rest (``dtype``,
        ``tensor_parallel_size``, ...) to ``LLM`` yourself.

    Raises:
        FileNotFoundError / ValueError: no ``config.json``, or an architecture without a
            fastpatch twin (the supported ones are listed).
        PatchFileError: with ``check``, a start file that does not fit the model.
    """
    cfg_path = Path(model) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: llm_kwargs needs a local Hugging Face model directory")
    archs = json.loads(cfg_path.read_text()).get("architectures") or []
    twin = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if twin is None:
        raise ValueError(
            f"{model} is a {archs or 'model without architectures'}; the fastpatch vLLM plugin serves "
            f"{sorted(ARCHITECTURES)}"
        )
    files = [os.fspath(patches)] if isinstance(patches, (str, os.PathLike)) else [os.fspath(p) for p in patches]
    if check:
        _check_start_files(Path(model), files)
    over: dict[str, Any] = {"architectures": [twin], "fastpatch_patches": [str(Path(f).resolve()) for f in files]}
    if layers is not None:
        over["fastpatch_layers"] = list(layers)
    over.update(hf_overrides or {})
    return {"model": os.fspath(model), "hf_overrides": over, "worker_extension_cls": WORKER_EXTENSION}
