"""Saving and loading an editor: patches (safetensors), memory set, config and edit records.

Layout of a saved editor directory (written atomically, :func:`fastpatch.atomic.atomic_directory`)::

    patches.safetensors   the patch bank (PatchBank.save: byte-reproducible)
    memory.safetensors    the memory set's rows and owners
    editor.json           version, config, FFN path, family, weights fingerprint, edits, prefixes
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, write_json_atomic
from .types import EditError, EditorConfig

__all__ = ["STATE_VERSION", "load_editor", "save_editor"]

#: Version of editor.json.
STATE_VERSION = 1


def save_editor(ed: Any, directory: str | os.PathLike[str]) -> None:
    """Save an :class:`~fastpatch.editor.Editor`'s patches, memory set and config to ``directory``
    (replaced atomically)."""
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        ed.ffn.save(tmp / "patches.safetensors")
        fp = ed.bank_fingerprint()
        save_file(ed.memory.state(), str(tmp / "memory.safetensors"),
                  metadata={"fingerprint": fp, "module_path": ed.ffn.module_path})
        write_json_atomic(tmp / "editor.json", {
            "version": STATE_VERSION,
            "config": ed.config.to_dict(),
            "module_path": ed.ffn.module_path,
            "module_path_arg": ed.module_path_arg,
            "family": ed.adapter.family,
            "fingerprint": fp,
            "edits": ed.edits,
            "next_code": ed.next_code,
            "context_prefixes": ed.prefixes,
            "subjects": ed.subjects,
            "phrasings": ed.phrasings.state(),
        })


def load_editor(cls: type, directory: str | os.PathLike[str], model: Any, tokenizer: Any) -> Any:
    """An editor of class ``cls`` restored from ``directory`` onto a fresh copy of the same model.

    Raises:
        EditError: not a saved editor, another state version, or patches for another FFN.
        PatchFileError: the patches are for other base weights.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        state = json.loads((directory / "editor.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EditError(f"{directory} is not a saved fastpatch editor: {e}") from e
    if state.get("version") != STATE_VERSION:
        raise EditError(f"{directory}: editor state version {state.get('version')!r} is not {STATE_VERSION}")
    ed = cls(model, tokenizer, EditorConfig.from_dict(state["config"]), module_path=state.get("module_path_arg"))
    if ed.ffn.module_path != state["module_path"]:
        raise EditError(f"{directory} holds patches for {state['module_path']!r}; this model's FFN is {ed.ffn.module_path!r}")
    ed.ffn.load(directory / "patches.safetensors")  # checks model/layer fingerprints
    ed.memory.load_state(load_file(str(directory / "memory.safetensors")))
    ed.edits = state["edits"]
    ed.next_code = int(state["next_code"])
    prefixes = state.get("context_prefixes")
    ed.prefixes = list(prefixes) if prefixes is not None else None
    ed.subjects = [str(x) for x in state.get("subjects", [])]
    ed.phrasings.load_state(state.get("phrasings", {}))
    return ed
