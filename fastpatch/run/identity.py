"""What identifies a run: fingerprints of its model, data and editor state, and the resume check."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.formats import content_fingerprint
from .errors import RunMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = [
    "check_resume",
    "data_fingerprint",
    "editor_state_id",
    "file_fingerprint",
    "model_fingerprint",
    "sha256_text",
]


def sha256_text(text: str) -> str:
    """sha256 hex digest of UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file."""
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": h.hexdigest()}


def _record_dict(r: EditRecord) -> dict[str, Any]:
    d = {
        "id": r.id, "prompt": r.prompt, "target": r.target, "ground_truth": r.ground_truth,
        "rephrases": list(r.rephrases), "locality": [list(p) for p in r.locality], "subject": r.subject,
    }
    label = getattr(r, "label", None)
    if label is not None:  # only classification records carry it: generative fingerprints are unchanged
        d["label"] = label
    return d


def data_fingerprint(records: Sequence[EditRecord]) -> str:
    """sha256 of the records' content (ids, prompts, targets, paraphrases, locality), in order."""
    return content_fingerprint(_record_dict(r) for r in records)


def model_fingerprint(name_or_path: str | os.PathLike[str] | None = None, model: Any = None) -> dict[str, Any]:
    """What identifies a model for resume: the resolved directory (or the name as given, lower
    case, when it is no path) and the sha256 of its ``config.json`` (directories) or of the
    loaded ``model``'s config. Built-in model names are the app's business
    (:func:`fastpatch.app.registry.model_identity`)."""
    out: dict[str, Any] = {}
    if name_or_path is not None:
        text = os.fspath(name_or_path)
        p = Path(text).expanduser()
        if p.exists():
            out["name"] = str(p.resolve())
            cfg = p / "config.json" if p.is_dir() else p
            if cfg.is_file() and cfg.stat().st_size < (64 << 20):
                out["config_sha256"] = file_fingerprint(cfg)["sha256"]
        else:
            out["name"] = text.strip().lower()
    elif model is not None:
        cfg = getattr(model, "config", None)
        out["name"] = str(getattr(cfg, "_name_or_path", "") or type(model).__name__)
        if cfg is not None and hasattr(cfg, "to_json_string"):
            try:
                out["config_sha256"] = sha256_text(cfg.to_json_string(use_diff=False))
            except Exception:  # noqa: BLE001 - configs that do not serialise
                pass
    return out


def editor_state_id(editor: Any) -> dict[str, Any]:
    """What identifies the edits an editor holds: its patch count and a hash of its edit ids."""
    edits = getattr(editor, "edits", None)
    ids = sorted(map(str, edits)) if isinstance(edits, dict) else []
    return {"num_patches": int(editor.num_patches), "n_edits": len(ids), "edits_sha256": sha256_text("\n".join(ids))}


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("name") != b.get("name"):
        return False
    ca, cb = a.get("config_sha256"), b.get("config_sha256")
    return ca is None or cb is None or ca == cb


def check_resume(existing: dict[str, Any], fingerprints: dict[str, Any]) -> None:
    """Raise :class:`RunMismatchError` if a run's stored fingerprints differ from these."""
    old = existing.get("fingerprints", {})
    old_model = old.get("model", {})
    if not _same_model(old_model, fingerprints["model"]):
        config = f" (config {str(old_model['config_sha256'])[:12]})" if old_model.get("config_sha256") else ""
        raise RunMismatchError(
            f"cannot resume: the run was made with model {old_model.get('name')!r}{config}"
            f", not {fingerprints['model'].get('name')!r}; use the same --model or another --out"
        )
    if old.get("data") != fingerprints["data"]:
        where = existing.get("data", {}).get("path") or existing.get("data", {}).get("name")
        raise RunMismatchError(
            f"cannot resume: the edit stream differs from the run's"
            f"{' (' + str(where) + ')' if where else ''} (data fingerprint "
            f"{str(old.get('data'))[:12]} != {fingerprints['data'][:12]}); use the same --data, "
            f"--format and --skip-bad, or another --out"
        )
    if old.get("weights") and fingerprints.get("weights") and old["weights"] != fingerprints["weights"]:
        raise RunMismatchError(
            f"cannot resume: the model's weights differ from the run's (patched-layer fingerprint "
            f"{old['weights']} != {fingerprints['weights']}); use the same --model or another --out"
        )
    if old.get("protocol") != fingerprints["protocol"]:
        raise RunMismatchError(
            f"cannot resume: the run uses protocol {old.get('protocol')!r}, not {fingerprints['protocol']!r}"
        )
