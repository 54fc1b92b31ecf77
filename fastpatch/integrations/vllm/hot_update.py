"""Hot updates of a running vLLM engine's patches: load a patch file, clear, roll back.

    from vllm import LLM
    from fastpatch.integrations.vllm import llm_kwargs, PatchUpdater

    llm = LLM(**llm_kwargs(model_dir, patches=["v1/patches.safetensors"]), dtype="float32")
    upd = PatchUpdater(llm)
    upd.load("v2/patches.safetensors")   # every later request sees v2
    upd.rollback()                        # back to v1

The engine's workers get the ``FastpatchWorkerExtension`` methods (``llm_kwargs`` sets
``worker_extension_cls``); ``PatchUpdater`` calls them on every rank with ``LLM.collective_rpc``:
first ``fastpatch_stage`` (each rank reads, validates and builds its slice beside the live one),
then, only if every rank succeeded, ``fastpatch_commit`` (each rank swaps references); otherwise
``fastpatch_discard`` everywhere and the error is raised. vLLM runs these calls in the worker's
own thread between two model steps, so no forward pass sees a mix of old and new patches.
``PatchUpdater`` also refuses to update while requests are in flight (a request that started
with the old patches would finish with the new ones): with the offline ``LLM`` API an update is
made between ``generate`` calls; an online server should drain before it updates.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from ...bank import PatchFileError

__all__ = ["FastpatchWorkerExtension", "PatchUpdater", "WORKER_EXTENSION"]

#: Value for ``LLM(worker_extension_cls=...)``.
WORKER_EXTENSION = "fastpatch.integrations.vllm.hot_update.FastpatchWorkerExtension"


class FastpatchWorkerExtension:
    """Methods mixed into each vLLM worker (``worker_extension_cls``); called through
    ``collective_rpc``. Each returns a plain dict (``ok``, and ``error`` or the rank's state), so
    that one rank's failure is reported, not raised inside the engine."""

    def _fastpatch_state(self) -> Any:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        state = getattr(model, "fastpatch", None)
        if state is None:
            raise RuntimeError(
                f"the served model ({type(model).__name__}) is not a fastpatch architecture: serve it "
                f"with fastpatch.integrations.vllm.llm_kwargs(...)"
            )
        return state

    def _fastpatch_call(self, fn: Callable[[Any], Any]) -> dict[str, Any]:
        try:
            return {"ok": True, **fn(self._fastpatch_state())}
        except (PatchFileError, RuntimeError, KeyError, ValueError, TypeError, OSError) as e:
            return {"ok": False, "error": str(e), "kind": type(e).__name__}

    def fastpatch_stage(self, token: str, paths: list[str], clear: bool = False) -> dict[str, Any]:
        """Validate ``paths`` and build this rank's new patch sets (nothing served changes)."""
        return self._fastpatch_call(lambda s: s.stage(token, paths, clear))

    def fastpatch_commit(self, token: str) -> dict[str, Any]:
        """Serve the staged update ``token``."""
        return self._fastpatch_call(lambda s: s.commit(token))

    def fastpatch_discard(self, token: str) -> dict[str, Any]:
        """Drop the staged update ``token``."""
        return self._fastpatch_call(lambda s: s.discard(token) or {})

    def fastpatch_rollback(self) -> dict[str, Any]:
        """Serve the state before the last commit."""
        return self._fastpatch_call(lambda s: s.rollback())

    def fastpatch_status(self) -> dict[str, Any]:
        """This rank's served patch sets."""
        return self._fastpatch_call(lambda s: s.describe())


class PatchUpdater:
    """Driver-side hot updates of an ``LLM`` built with ``llm_kwargs`` (all ranks at once).

    Args:
        llm: a ``vllm.LLM`` whose workers have ``FastpatchWorkerExtension``.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def _rpc(self, method: str, *args: Any) -> list[dict[str, Any]]:
        return self.llm.collective_rpc(method, args=args)

    def _check_idle(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and engine.has_unfinished_requests():
            raise RuntimeError(
                "requests are in flight: a patch update now would change the patches under them; "
                "update between generate() calls (or drain the server first)"
            )

    @staticmethod
    def _raise_first(results: list[dict[str, Any]]) -> None:
        for r in results:
            if not r.get("ok"):
                err = r.get("error", "unknown error")
                raise (PatchFileError if r.get("kind") == "PatchFileError" else RuntimeError)(err)

    def _update(self, paths: list[str], clear: bool) -> list[dict[str, Any]]:
        # absolute paths: the workers resolve them, possibly from another directory
        self._check_idle()
        token = uuid.uuid4().hex
        staged = self._rpc("fastpatch_stage", token, paths, clear)
        if not all(r.get("ok") for r in staged):
            self._rpc("fastpatch_discard", token)
            self._raise_first(staged)
        done = self._rpc("fastpatch_commit", token)
        self._raise_first(done)  # cannot fail once staged everywhere; reported if it ever does
        return done

    def load(self, *paths: str | os.PathLike) -> list[dict[str, Any]]:
        """Serve the patches of ``paths`` (each replaces its layer's set; other layers keep
        theirs). Returns every rank's new state.

        Raises:
            PatchFileError: a file does not fit the served model (nothing changes on any rank).
            RuntimeError: requests are in flight.
        """
        if not paths:
            raise ValueError("load() needs at least one patch file (clear() serves no patches)")
        return self._update([os.path.abspath(p) for p in paths], clear=False)

    def replace(self, *paths: str | os.PathLike) -> list[dict[str, Any]]:
        """Serve exactly the patches of ``paths``: layers they do not name get no patches."""
        return self._update([os.path.abspath(p) for p in paths], clear=True)

    def clear(self) -> list[dict[str, Any]]:
        """Serve no patches (the base model); ``rollback()`` undoes it."""
        return self._update([], clear=True)

    def rollback(self) -> list[dict[str, Any]]:
        """Serve the patches of before the last update again.

        Raises:
            RuntimeError: nothing to roll back to, or requests are in flight.
        """
        self._check_idle()
        done = self._rpc("fastpatch_rollback")
        self._raise_first(done)
        return done

    def status(self) -> list[dict[str, Any]]:
        """Every rank's served patch sets (total, local count, bytes, source file per layer)."""
        done = self._rpc("fastpatch_status")
        self._raise_first(done)
        return done
