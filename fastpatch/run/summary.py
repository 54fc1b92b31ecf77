"""The run's summary, its environment (versions, peak memory) and the heatmap's activations."""

from __future__ import annotations

import logging
import resource
import sys
from typing import Any

from ..atomic import atomic_file
from ..metrics import percentile
from .scores import SCORE_NAMES
from .session import RunSession

__all__ = ["build_summary", "peak_memory", "save_activations", "versions"]

log = logging.getLogger("fastpatch.run")


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) and peak CUDA memory allocated (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    cuda = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.max_memory_allocated() / (1024 * 1024)
    except Exception:  # noqa: BLE001
        pass
    return {"peak_rss_mib": round(rss_mib, 1), "peak_cuda_mib": None if cuda is None else round(cuda, 1)}


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a run depends on."""
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("fastpatch", "torch", "transformers", "datasets", "numpy", "triton", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out["cpu_threads"] = str(torch.get_num_threads())
    except Exception:  # noqa: BLE001
        pass
    return out


def save_activations(run: RunSession, max_edits: int) -> None:
    """activations.npz: each patch's activation on the first ``max_edits`` edit prompts (the heatmap)."""
    import numpy as np

    st = run.state
    idx = st.edited[:max_edits]
    if not idx or run.num_patches() <= 0:
        run.paths.activations.unlink(missing_ok=True)
        return
    try:
        acts = run.ed.activations([run.records[i].prompt for i in idx])
        arr = acts.detach().float().cpu().numpy() if hasattr(acts, "detach") else np.asarray(acts, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - the heatmap is optional
        log.warning("could not compute patch activations for the heatmap: %s", err)
        return
    with atomic_file(run.paths.activations, "wb") as fh:
        np.savez_compressed(fh, activations=arr, rows=np.asarray(idx), ids=np.asarray([run.records[i].id for i in idx]))


def build_summary(run: RunSession, info: dict[str, Any], complete: bool) -> dict[str, Any]:
    """summary.json: the run's metrics, counts, timings, memory, retain sets and versions."""
    st = run.state
    secs = st.edit_seconds
    mem = peak_memory()
    wall = run.wall_seconds()
    return {
        "complete": complete,
        "model": info["fingerprints"]["model"].get("name"),
        "data": info.get("data", {}).get("name") or info.get("data", {}).get("path"),
        "protocol": run.protocol,
        "task": getattr(run.ed, "task", None),
        "requests": st.position,
        "requests_total": run.n_total,
        "edits": st.n_edits,
        "skipped_correct": st.n_skipped,
        "successes": st.n_success,
        "metrics": st.current(),
        "scores": _scores(run),
        "editor_success_rate": (st.n_editor_success / st.n_edits) if st.n_edits else None,
        "patches": run.num_patches(),
        "neurons_per_edit": (st.n_neurons / st.n_edits) if st.n_edits else None,
        "time": {
            "edit_seconds_median": percentile(secs, 50),
            "edit_seconds_p90": percentile(secs, 90),
            "edit_seconds_mean": (sum(secs) / len(secs)) if secs else None,
            "edit_seconds_total": sum(secs),
            "eval_seconds_total": st.eval_seconds,
            "check_seconds_total": st.check_seconds,
            "baseline_seconds": run.baseline.get("seconds"),
            "memory_seconds": run.memory.get("seconds"),
            "wall_seconds": wall,
        },
        # the corpus the run built (texts, vectors) and the rows the memory holds now (earlier
        # edits' inputs included), when the editor can say
        "memory_set": {**{k: run.memory.get(k) for k in ("texts", "vectors")}, "rows_now": _memory_rows(run.ed)},
        "peak_memory": {"rss_mib": max(run.peak_rss_before, mem["peak_rss_mib"] or 0.0),
                        "cuda_mib": mem["peak_cuda_mib"]},
        "retain_sets": {"train": len(run.baseline.get("train", [])),
                        "train_candidates": run.baseline.get("train_candidates"),
                        "test": len(run.baseline.get("test", [])),
                        "test_right_before": sum(bool(c) for *_, c in run.baseline.get("test", [])),
                        "test_pre_accuracy": run.baseline.get("test_accuracy"),
                        "min_right": run.options.retain.min_right},
        "skipped_rows": info.get("skipped_rows", []),
        "versions": versions(),
        "editor_config": _editor_config(run.ed),
        "run": {k: v for k, v in info.items() if k not in ("skipped_rows",)},
    }


def _memory_rows(ed: Any) -> int | None:
    """Rows in the editor's memory set (None when it has none)."""
    try:
        return int(len(ed.memory))
    except Exception:  # noqa: BLE001 - an editor without a memory set
        return None


def _scores(run: RunSession) -> dict[str, Any]:
    """The CounterFact, free-generation and general-ability scores of the latest evaluation point,
    with the unedited model's values beside them (``pre``) and the sizes of the sets they are
    measured on. A score that point did not measure is left out, not carried over from an earlier
    point (a run resumed for its final point with ``generation_metrics=False`` must not report the
    free-generation scores of an earlier stage as its own)."""
    last = run.state.evals[-1] if run.state.evals else {}
    out: dict[str, Any] = {k: last[k] for k in SCORE_NAMES if k in last}
    pre: dict[str, Any] = dict(run.baseline.get("counterfact") or {})
    ability = run.baseline.get("ability") or {}
    if ability:
        pre["PPL"] = ability.get("PPL_0")
        out["ability_set"] = {"questions_right_before": len(ability.get("questions", [])),
                              "candidates": ability.get("candidates"), "texts": ability.get("texts")}
    if pre:
        out["pre"] = pre
    return out


def _editor_config(ed: Any) -> dict[str, Any] | None:
    """The editor's configuration, with the FFN its patches go into (``module_path``)."""
    cfg = getattr(ed, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            out = cfg.to_dict()
        except Exception:  # noqa: BLE001
            return None
        ffn = getattr(ed, "ffn", None)
        if getattr(ffn, "module_path", None):
            out["module_path"] = ffn.module_path
        return out
    return None
