"""Serve fastpatch-edited models in vLLM (``pip install fastpatch[vllm]``).

    from vllm import LLM, SamplingParams
    from fastpatch.integrations.vllm import PatchUpdater, llm_kwargs

    llm = LLM(**llm_kwargs("smollm2-dir", patches=["edits/patches.safetensors"]), dtype="float32")
    llm.generate(["The capital of Peru is"], SamplingParams(temperature=0))
    PatchUpdater(llm).load("edits-v2/patches.safetensors")   # hot update between requests

Modules: ``plugin`` (the ``vllm.general_plugins`` entry point, ``llm_kwargs``), ``model`` (the
patched vLLM model classes; imports vLLM), ``hot_update`` (``PatchUpdater`` and the worker
extension), ``state`` / ``patchfile`` / ``sharding`` / ``ops`` (pure PyTorch). Importing this
package does not import vLLM.
"""

from __future__ import annotations

from .hot_update import FastpatchWorkerExtension, PatchUpdater
from .plugin import ARCHITECTURES, llm_kwargs, register
from .sharding import shard_patches, shard_range

__all__ = ["ARCHITECTURES", "FastpatchWorkerExtension", "PatchUpdater", "llm_kwargs", "register", "shard_patches",
           "shard_range"]
