"""The sequential-edit runner: stream -> edits -> metrics, checkpoints and reports.

    from fastpatch.runner import run_stream
    summary = run_stream(editor, records, "runs/x", protocol="tpatcher", eval_every=50)

Protocols:

* ``"tpatcher"`` (Huang et al.): a request is edited only when the *current* model gets it wrong.
  ``Editor.edit`` checks this itself (teacher-forced, as ``Editor.check``) and adds no patch when
  the model is already right (``EditResult.already_correct``); the runner logs such a request as a
  skip, not an edit.
* ``"easyedit"``: every request is an edit (an already-right one counts, with no patch added).

Metrics (see :mod:`fastpatch.metrics` for every formula): SR and GR after every edit (the prompt
and its paraphrases checked in one batch); ER, TrainR, TestR, Rel., Loc. (and Gen.) every
``eval_every`` edits and at the end, evaluated in batches of ``batch_size`` pairs sorted by length.
The pre-edit outputs Loc. and TrainR/TestR compare against are computed once, before the first
edit, and kept in baseline.json.

Classifiers (``editor.task == "cls"``, e.g. ``--model minilm --data claims``): a record's target
names a class (``"true"``, through the model's ``config.label2id``, or the index as text), its
``label`` field (when present) must agree, and so must every locality/retain answer; all of it is
checked before the run starts (:func:`classification_labels`, a :class:`RunError` naming the
request otherwise). Every metric is then computed on labels: "right" means the predicted class
is the target class, and Loc. compares predicted classes before and after.

Output directory::

    run.json          what was run: model/data/weights fingerprints, protocol, options
    baseline.json     pre-edit outputs: locality tokens per request, retain sets A/B + correctness
    edits.jsonl       one line per processed request (edits and T-Patcher skips), metrics so far
    evals.jsonl       one line per evaluation point
    checkpoint/       LATEST (name of the current checkpoint) + ckpt-<edits>-<position>/
                          editor/ (Editor.save: patches, memory, config) and state.json
    summary.json/.csv final (or, while running, latest checkpointed) metrics, timings, versions
    activations.npz   edit prompts x patches activation matrix (for the heatmap)
    metrics.png heatmap.png latency.png

Crash safety: every ``checkpoint_every`` edits (and at the end) edits.jsonl/evals.jsonl are
flushed and fsynced, the editor is saved into a fresh temporary directory together with
``state.json`` (stream position, metric state, the byte length of the two JSONL files), the
directory is renamed into place and ``LATEST`` is replaced atomically. A checkpoint is thus either
complete or invisible. ``resume=True`` restores the state, truncates the JSONL files to their
checkpointed length (dropping the lines of edits done after it) and continues from the
checkpointed position: no edit is lost or repeated. A resume whose model, data or protocol differ
from the run's is refused with :class:`RunMismatchError`; a damaged checkpoint (``LATEST`` naming
a missing one, a corrupt ``state.json``) with :class:`RunError`, never by silently starting over.

Every prompt, paraphrase and locality prompt the stream is scored on is tokenized before the run
starts: one the editor cannot score (e.g. longer than the model's context) is a :class:`RunError`
naming the request, not a crash in the middle of the stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data.formats import content_fingerprint
from .metrics import (
    EVAL_METRICS,
    MetricState,
    edit_retain_rate,
    exact_match_rate,
    generalization_rate,
    locality,
    percentile,
    test_retain_rate,
    train_retain_rate,
)

if TYPE_CHECKING:  # pragma: no cover
    from .data.formats import EditRecord

__all__ = [
    "PROTOCOLS",
    "RunError",
    "RunExistsError",
    "RunMismatchError",
    "RunPaths",
    "classification_labels",
    "data_fingerprint",
    "file_fingerprint",
    "latest_checkpoint",
    "model_fingerprint",
    "read_run_info",
    "retain_split",
    "run_stream",
]

log = logging.getLogger("fastpatch.runner")

PROTOCOLS: tuple[str, ...] = ("tpatcher", "easyedit")
_STATE_VERSION = 1


class RunError(RuntimeError):
    """A run cannot start or continue (message says why and what to do)."""


class RunMismatchError(RunError):
    """``resume`` with a model, data file or protocol different from the checkpointed run."""


class RunExistsError(RunError):
    """The output directory already holds a run and neither resume nor overwrite was asked."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.json"

    @property
    def edits(self) -> Path:
        return self.root / "edits.jsonl"

    @property
    def evals(self) -> Path:
        return self.root / "evals.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoint"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "LATEST"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def activations(self) -> Path:
        return self.root / "activations.npz"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write JSON to ``path`` through a temporary file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent, ensure_ascii=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_json(path: Path) -> Any:
    """A run file's JSON; a corrupt or truncated file is a :class:`RunError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{path} is corrupt or truncated (not valid JSON: {err}); start over with --overwrite "
                       f"(or another --out)") from None


def latest_checkpoint(out_dir: str | os.PathLike[str], strict: bool = False) -> Path | None:
    """The directory of the run's latest complete checkpoint (holding ``editor/`` and
    ``state.json``), or None if there is none.

    Args:
        out_dir: the run directory.
        strict: raise :class:`RunError` when ``checkpoint/LATEST`` exists but names no complete
            checkpoint (a damaged run directory: ``LATEST`` is only written once its checkpoint is
            complete), instead of returning None as for a run that has no checkpoint yet.
    """
    paths = RunPaths(Path(out_dir))
    try:
        name = paths.latest.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    ckpt = paths.checkpoints / name
    if not name or not (ckpt / "state.json").is_file():
        if strict:
            raise RunError(
                f"{paths.latest} names checkpoint {name!r}, but {ckpt / 'state.json'} is missing: the checkpoint "
                f"is damaged, so the run cannot resume; start over with --overwrite (or another --out)")
        return None
    return ckpt


def _read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked for its version and the fields a resume reads."""
    state = _read_json(ckpt / "state.json")
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise RunError(f"{ckpt / 'state.json'}: checkpoint state version {version!r} is not {_STATE_VERSION} "
                       f"(written by another fastpatch version?); start over with --overwrite (or another --out)")
    missing = [k for k in ("position", "n_edits", "edits_bytes", "evals_bytes", "metrics") if k not in state]
    if missing:
        raise RunError(f"{ckpt / 'state.json'} lacks {', '.join(missing)}: the checkpoint is damaged; start over "
                       f"with --overwrite (or another --out)")
    return state


def read_run_info(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run.json`` of a run directory, or None (:class:`RunError` if it is corrupt)."""
    p = RunPaths(Path(out_dir)).run_json
    return _read_json(p) if p.is_file() else None


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _sha256_text(text: str) -> str:
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
    """What identifies a model for resume: the name as given (``smollm2``) or the resolved
    directory, and the sha256 of its ``config.json`` (directories) or of the loaded config."""
    out: dict[str, Any] = {}
    if name_or_path is not None:
        text = os.fspath(name_or_path)
        p = Path(text).expanduser()
        from . import models

        key = text.strip().lower()
        # resolve_model reads built-in names before paths; aliases name the same model
        if key in set(getattr(models, "_SMOLLM2_NAMES", ())):
            out["name"] = "smollm2"
        elif key in set(getattr(models, "_MINILM_NAMES", ())):
            out["name"] = "minilm"
        elif p.exists():
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
                out["config_sha256"] = _sha256_text(cfg.to_json_string(use_diff=False))
            except Exception:  # noqa: BLE001 - configs that do not serialise
                pass
    return out


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("name") != b.get("name"):
        return False
    ca, cb = a.get("config_sha256"), b.get("config_sha256")
    return ca is None or cb is None or ca == cb


def retain_split(pairs: Sequence[tuple[str, str]], size: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split locality pairs into the TrainR candidates (A) and the TestR set (B).

    Pairs are de-duplicated by prompt (first answer kept) and assigned by the parity of the first
    byte of sha256(prompt): stable across runs and orders. Each half keeps at most ``size`` pairs,
    in input order.
    """
    a: list[tuple[str, str]] = []
    b: list[tuple[str, str]] = []
    seen: set[str] = set()
    for prompt, answer in pairs:
        if prompt in seen:
            continue
        seen.add(prompt)
        half = a if hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 2 == 0 else b
        if size is None or len(half) < size:
            half.append((prompt, answer))
    return a, b


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def _editor_model(editor: Any) -> Any:
    return getattr(editor, "model", None)


def editor_state_id(editor: Any) -> dict[str, Any]:
    """What identifies the edits an editor holds: its patch count and a hash of its edit ids."""
    edits = getattr(editor, "edits", None)
    ids = sorted(map(str, edits)) if isinstance(edits, dict) else []
    return {"num_patches": int(editor.num_patches), "n_edits": len(ids),
            "edits_sha256": _sha256_text("\n".join(ids))}


def _truncate(path: Path, size: int) -> None:
    if not path.exists():
        if size:
            raise RunError(f"{path} is missing but the checkpoint expects {size} bytes of it")
        path.touch()
        return
    actual = path.stat().st_size
    if actual < size:
        raise RunError(f"{path} holds {actual} bytes, fewer than the {size} the checkpoint recorded")
    if actual > size:
        with open(path, "r+b") as fh:
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())


class _Run:
    """One invocation of :func:`run_stream` (state shared by its helpers)."""

    def __init__(self, editor: Any, records: Sequence[EditRecord], out_dir: Path, *, protocol: str,
                 eval_every: int, checkpoint_every: int, limit: int | None, batch_size: int,
                 progress: bool, plots: bool, on_record: Callable[[dict[str, Any]], None] | None) -> None:
        self.ed = editor
        self.records = records
        self.paths = RunPaths(out_dir)
        self.protocol = protocol
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.n_total = len(records) if limit is None else min(limit, len(records))
        self.batch_size = batch_size
        self.progress = progress
        self.plots = plots
        self.on_record = on_record
        self.state = MetricState()
        self.baseline: dict[str, Any] = {}
        self.session_start = time.perf_counter()
        self.wall_before = 0.0  # wall seconds of earlier sessions (resume)
        self.peak_rss_before = 0.0
        self.edits_fh: Any = None
        self.evals_fh: Any = None
        self.last_ckpt_edits = -1
        self.memory: dict[str, Any] = {}  # memory corpus: texts, vectors, seconds
        #: classifiers: target text -> class index (see :func:`classification_labels`); else None
        self.labels: dict[str, int] | None = None

    # ------------------------------------------------------------------ baseline
    def compute_baseline(
        self,
        retain_pairs: Sequence[tuple[str, str]],
        retain_size: int | None,
        retain_sets: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]] | None = None,
    ) -> dict[str, Any]:
        n = self.n_total
        t0 = time.perf_counter()
        loc_pairs: list[tuple[str, str]] = []
        index: dict[tuple[str, str], int] = {}
        for r in self.records[:n]:
            for p in r.locality:
                key = (p[0], p[1])
                if key not in index:
                    index[key] = len(loc_pairs)
                    loc_pairs.append(key)
        if retain_sets is not None:  # given explicitly: distinct pairs, the first retain_size of each
            distinct = [list(dict.fromkeys((p, t) for p, t in s)) for s in retain_sets]
            a, b = (d if retain_size is None else d[:retain_size] for d in distinct)
        else:
            a, b = retain_split(retain_pairs, retain_size)
        self.check_tokenizable([(p, t, f"retain pair {p[:60]!r}") for p, t in a + b])
        ok, tokens = self.check_and_tokens(a + b, loc_pairs)
        loc_tokens = [[tokens[index[(p, a)]] for p, a in r.locality] for r in self.records[:n]]
        train = [[p, t] for (p, t), c in zip(a, ok[: len(a)]) if c]
        test = [[p, t, bool(c)] for (p, t), c in zip(b, ok[len(a):])]
        base = {
            "n_records": n,
            "loc_tokens": loc_tokens,
            "train": train,  # A: pairs the unedited model gets right
            "train_candidates": len(a),
            "test": test,  # B: every pair of its half + whether the unedited model got it right
            "test_accuracy": exact_match_rate([c for *_, c in test]),
            "train_accuracy": (len(train) / len(a)) if a else None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "baseline: %d locality pairs; TrainR set %d/%d right before editing; TestR set %d (pre-edit accuracy %s) in %.1fs",
            len(loc_pairs), len(train), len(a), len(test), _fmt(base["test_accuracy"]), base["seconds"],
        )
        return base

    # ---------------------------------------------------------------- evaluation
    def target(self, target: str) -> Any:
        """What the editor scores a target as: the text itself, or for a classifier the class
        index it names (``"true"`` -> 1 through ``config.label2id``; validated up front)."""
        if self.labels is None:
            return target
        if target not in self.labels:  # e.g. a resumed run's baseline pairs: resolve (or refuse) now
            self.labels.update(classification_labels(self.ed, [], [("", target)]) or {})
        return self.labels[target]

    def check_tokenizable(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Raise :class:`RunError` naming the first ``(prompt, target, where)`` item the editor
        cannot score (e.g. longer than the model's context, or a target of no tokens): such an
        item would stop the run in the middle of the stream, at every resume again."""
        from .editor import EditError

        target_ids = getattr(self.ed, "target_ids", None)
        if target_ids is None or not items:
            return
        try:  # tokenization only, all at once; item by item to find the culprit
            target_ids([p for p, _, _ in items], [self.target(t) for _, t, _ in items])
            return
        except EditError:
            pass
        for p, t, where in items:
            try:
                target_ids([p], [self.target(t)])
            except EditError as err:
                raise RunError(f"{where}: {err}; fix or remove it (or stop the stream before it with "
                               f"--limit)") from None

    def _sorted_call(self, fn: Callable[..., list[Any]], pairs: Sequence[tuple[str, str]]) -> list[Any]:
        """``fn(prompts, targets, batch_size=...)`` over pairs sorted by length (less padding in
        each batch), results returned in the input order."""
        if not pairs:
            return []
        order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
        res = fn([pairs[k][0] for k in order], [self.target(pairs[k][1]) for k in order], batch_size=self.batch_size)
        out: list[Any] = [None] * len(pairs)
        for k, r in zip(order, res):
            out[k] = r
        return out

    def check_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        return [bool(x) for x in self._sorted_call(self.ed.check, pairs)]

    def token_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        return [list(map(int, t)) for t in self._sorted_call(self.ed.predict_tokens, pairs)]

    def check_and_tokens(
        self, check: Sequence[tuple[str, str]], tokens: Sequence[tuple[str, str]]
    ) -> tuple[list[bool], list[list[int]]]:
        """``ok`` for the ``check`` pairs and argmax tokens for the ``tokens`` pairs.

        With ``Editor.target_ids`` (the target token ids, tokenization only) this is a single
        batched forward over the union of both sets -- locality pairs are usually in both (Loc.
        reads their tokens, TrainR/TestR their correctness); without it, two passes.
        """
        target_ids = getattr(self.ed, "target_ids", None)
        if target_ids is None:
            return self.check_pairs(check), self.token_pairs(tokens)
        index: dict[tuple[str, str], int] = {}
        for p in list(check) + list(tokens):
            index.setdefault((p[0], p[1]), len(index))
        union = list(index)
        toks = self.token_pairs(union)
        labels = target_ids([p for p, _ in check], [self.target(t) for _, t in check]) if check else []
        ok = [toks[index[(p, t)]] == list(map(int, lab)) for (p, t), lab in zip(check, labels)]
        return ok, [toks[index[(p, t)]] for p, t in tokens]

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """ER, TrainR, TestR, Rel., Loc. (and Gen.) with the current model, batched.

        Gen. (every paraphrase of every request so far) is the costliest; it is evaluated at every
        point under the EasyEdit protocol and only at the end under the T-Patcher one, where GR
        (measured right after each edit) already tracks generalization.
        """
        t0 = time.perf_counter()
        st, recs = self.state, self.records
        pos = st.position
        with_gen = final or self.protocol == "easyedit"
        pairs: dict[tuple[str, str], int] = {}

        def need(p: str, t: str) -> int:
            return pairs.setdefault((p, t), len(pairs))

        own = [need(r.prompt, r.target) for r in recs[:pos]]
        para = [[need(p, r.target) for p in r.rephrases] for r in recs[:pos]] if with_gen else []
        train = [need(p, t) for p, t in self.baseline["train"]]
        test = [need(p, t) for p, t, _ in self.baseline["test"]]
        keys = list(pairs)
        loc_index: dict[tuple[str, str], int] = {}
        for r in recs[:pos]:
            for p, a in r.locality:
                loc_index.setdefault((p, a), len(loc_index))
        loc_keys = list(loc_index)
        ok, now_tokens = self.check_and_tokens(keys, loc_keys)
        loc_pairs = [
            [(self.baseline["loc_tokens"][i][j], now_tokens[loc_index[(p, a)]])
             for j, (p, a) in enumerate(recs[i].locality)]
            for i in range(pos)
        ]
        values = {
            "ER": edit_retain_rate([ok[own[i]] for i in st.edited]),
            "TrainR": train_retain_rate([True] * len(train), [ok[k] for k in train]),
            "TestR": test_retain_rate([bool(c) for *_, c in self.baseline["test"]], [ok[k] for k in test]),
            "Rel": exact_match_rate([ok[k] for k in own]),
            "Gen": generalization_rate([[ok[k] for k in ks] for ks in para]) if with_gen else None,
            "Loc": locality(loc_pairs),
            "n_eval_prompts": len(keys) + len(loc_keys),
        }
        if not with_gen:
            del values["Gen"]  # not measured here (the previous value stays current)
        seconds = time.perf_counter() - t0
        values["eval_seconds"] = round(seconds, 3)
        st.eval_seconds += seconds
        point = st.record_eval(values)
        self._write_line(self.evals_fh, {**point, "SR": st.sr, "GR": st.gr, "patches": self._num_patches()})
        shown = {"SR": st.sr, "GR": st.gr, **{k: point.get(k) for k in EVAL_METRICS}}
        log.info("after %d edits (%d requests): %s [eval %.1fs, %d prompts]", st.n_edits, pos,
                 " ".join(f"{k}={_fmt(v)}" for k, v in shown.items() if k in point or k in ("SR", "GR")),
                 seconds, values["n_eval_prompts"])
        return point

    # ------------------------------------------------------------------- helpers
    def _num_patches(self) -> int:
        try:
            return int(self.ed.num_patches)
        except Exception:  # noqa: BLE001
            return -1

    @staticmethod
    def _write_line(fh: Any, obj: dict[str, Any]) -> None:
        fh.write(json.dumps(obj, ensure_ascii=False, default=_json_default) + "\n")
        fh.flush()

    def wall_seconds(self) -> float:
        return self.wall_before + (time.perf_counter() - self.session_start)

    # ---------------------------------------------------------------- checkpoint
    def checkpoint(self, run_info: dict[str, Any]) -> Path:
        st, paths = self.state, self.paths
        for fh in (self.edits_fh, self.evals_fh):
            fh.flush()
            os.fsync(fh.fileno())
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{st.n_edits:07d}-{st.position:07d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=paths.checkpoints))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
            self.ed.save(tmp / "editor")
            mem = peak_memory()
            state = {
                "version": _STATE_VERSION,
                "position": st.position,
                "n_edits": st.n_edits,
                "edits_bytes": os.fstat(self.edits_fh.fileno()).st_size,  # flushed + fsynced above
                "evals_bytes": os.fstat(self.evals_fh.fileno()).st_size,
                "editor": editor_state_id(self.ed),
                "num_patches": self._num_patches(),
                "fingerprints": run_info["fingerprints"],
                "wall_seconds": self.wall_seconds(),
                "peak_rss_mib": max(self.peak_rss_before, mem["peak_rss_mib"] or 0.0),
                "memory_set": self.memory,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "metrics": st.to_dict(),
            }
            write_json_atomic(tmp / "state.json", state)
            _fsync_dir(tmp)
            final = paths.checkpoints / name
            if final.exists():  # same position checkpointed before: never touch the current one
                name = f"{name}-{time.time_ns()}"
                final = paths.checkpoints / name
            os.rename(tmp, final)
            _fsync_dir(paths.checkpoints)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The pointer flips atomically; until then the previous checkpoint stays current.
        tmp_latest = paths.checkpoints / f".LATEST.tmp-{os.getpid()}"
        with open(tmp_latest, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_latest, paths.latest)
        _fsync_dir(paths.checkpoints)
        for old in paths.checkpoints.iterdir():  # older checkpoints, leftovers of killed writes
            if old.name in (name, "LATEST"):
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        self.last_ckpt_edits = st.n_edits
        # A partial summary beside every checkpoint, so `fastpatch report` works mid-run.
        from . import report

        report.write_summary(paths.root, build_summary(self, run_info, complete=st.position >= self.n_total))
        log.debug("checkpoint %s (%d requests, %d edits)", name, st.position, st.n_edits)
        return final


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def run_stream(
    editor: Any,
    stream: Sequence[EditRecord] | Any,
    out_dir: str | os.PathLike[str],
    protocol: str = "tpatcher",
    eval_every: int = 50,
    checkpoint_every: int | None = None,
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    memory_texts: Sequence[str] | None = None,
    retain_pairs: Sequence[tuple[str, str]] | None = None,
    retain_size: int | None = 200,
    retain_sets: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]] | None = None,
    batch_size: int = 32,
    model_id: dict[str, Any] | str | None = None,
    data_id: dict[str, Any] | None = None,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
    plots: bool = True,
    heatmap_max_edits: int = 2000,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run an edit stream through ``editor`` and write the run's outputs to ``out_dir``.

    Args:
        editor: a :class:`fastpatch.editor.Editor`. On ``resume`` it must already hold the latest
            checkpoint (``Editor.load(latest_checkpoint(out_dir) / "editor", model, tokenizer)``);
            this is verified (patch count and edit ids).
        stream: the requests, a sequence of :class:`~fastpatch.data.formats.EditRecord` (or a
            ``StreamLoad``, whose ``.skipped`` rows are reported in the summary).
        out_dir: the run directory (created).
        protocol: ``"tpatcher"`` (edit only what the current model gets wrong) or ``"easyedit"``
            (edit every request).
        eval_every: evaluate ER/TrainR/TestR/Rel/Gen/Loc every this many edits (0: only at the end).
        checkpoint_every: checkpoint every this many edits (default: ``eval_every``, or 50 when that
            is 0). A checkpoint is always written at the end.
        limit: process only the first ``limit`` requests.
        resume: continue the run in ``out_dir`` from its latest checkpoint.
        overwrite: delete a run already in ``out_dir`` and start over.
        memory_texts: the T-Patcher memory corpus, passed to ``editor.build_memory`` on a fresh
            start (a resumed editor carries its memory in the checkpoint).
        retain_pairs: ``(prompt, answer)`` pairs for TrainR/TestR (default: every locality pair of
            the stream). Split by :func:`retain_split`, at most ``retain_size`` per half.
        retain_sets: ``(A, B)``: the TrainR candidates and the TestR set given explicitly (e.g. the
            classifier's training claims and held-out claims), instead of splitting
            ``retain_pairs``; each keeps its first ``retain_size`` distinct pairs.
        batch_size: evaluation batch size.
        model_id: what identifies the model for resume (see :func:`model_fingerprint`; default:
            derived from ``editor.model``).
        data_id: extra data identity stored in run.json (e.g. :func:`file_fingerprint`).
            The refusal to resume on other data is based on :func:`data_fingerprint` of ``stream``.
        run_info: extra JSON-able facts stored in run.json and the summary (e.g. CLI options).
        progress: show a tqdm progress bar (rate and ETA).
        plots: render the PNG plots at the end.
        heatmap_max_edits: compute patch activations for at most this many edit prompts.
        on_record: called with each edits.jsonl line after it is written.

    Returns:
        The summary (also written to summary.json / summary.csv).

    Raises:
        RunMismatchError: resume with another model, data or protocol.
        RunExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        RunError: inconsistent or damaged checkpoint (e.g. the editor does not hold it, a corrupt
            state.json, a ``limit`` below its position), or a request text the editor cannot score
            (the message names the request).
    """
    from . import report  # matplotlib is imported lazily inside

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    if checkpoint_every is None:
        checkpoint_every = eval_every or 50
    if checkpoint_every <= 0:
        raise ValueError(f"checkpoint_every must be > 0, got {checkpoint_every}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")

    skipped_rows: list[Any] = []
    if hasattr(stream, "records"):
        skipped_rows = [list(s) for s in getattr(stream, "skipped", [])]
        records = list(stream.records)
    else:
        records = list(stream)
    out = Path(out_dir)
    paths = RunPaths(out)
    if isinstance(model_id, str):
        model_id = model_fingerprint(model_id)
    model_fp = model_id or model_fingerprint(model=_editor_model(editor))
    fingerprints = {"model": model_fp, "data": data_fingerprint(records), "protocol": protocol}
    try:  # the patched layer's base weights: catches a different model under the same name
        fingerprints["weights"] = str(editor.bank_fingerprint())
    except Exception:  # noqa: BLE001
        pass

    run = _Run(editor, records, out, protocol=protocol, eval_every=eval_every, checkpoint_every=checkpoint_every,
               limit=limit, batch_size=batch_size, progress=progress, plots=plots, on_record=on_record)
    # Classifiers: every target must name one of the model's classes (checked before anything is written).
    extra = [p for s in (retain_sets or ()) for p in s] + list(retain_pairs or [])
    run.labels = classification_labels(editor, records, extra)
    # Every text the stream's requests are scored on (checked before anything is written).
    for r in records[: run.n_total]:
        where = f"request {r.id!r} (row {r.source_row})"
        run.check_tokenizable(
            [(r.prompt, r.target, f"{where}, prompt {r.prompt[:60]!r}")]
            + [(p, r.target, f"{where}, paraphrase {p[:60]!r}") for p in r.rephrases]
            + [(p, a, f"{where}, locality prompt {p[:60]!r}") for p, a in r.locality])

    # ------------------------------------------------------------- start or resume
    if overwrite and not resume and paths.run_json.is_file():
        existing: dict[str, Any] | None = {}  # replaced below, whatever it holds (even a corrupt run.json)
    else:
        existing = read_run_info(out) if paths.run_json.is_file() else None
    if existing is not None and not resume:
        if not overwrite:
            raise RunExistsError(
                f"{out} already holds a run; pass resume=True (--resume) to continue it or "
                f"overwrite=True (--overwrite) to start over"
            )
        _clear_run(paths)
        existing = None
    out.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if existing is not None:
        check_resume(existing, fingerprints)
        ckpt = latest_checkpoint(out, strict=True)
    info = {
        "fingerprints": fingerprints,
        "data": data_id or {},
        "protocol": protocol,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "limit": limit,
        "n_stream": len(records),
        "retain_size": retain_size,
        "batch_size": batch_size,
        "skipped_rows": skipped_rows,
        "created": (existing or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sessions": (existing or {}).get("sessions", 0) + 1,
        **(run_info or {}),
    }
    if ckpt is None and editor.num_patches:
        log.warning("the editor already holds %d patches: the 'pre-edit' baseline is of the patched model",
                    editor.num_patches)

    if ckpt is not None:
        state = _read_state(ckpt)
        now = editor_state_id(editor)
        if state.get("editor") != now:
            raise RunError(
                f"the editor does not hold checkpoint {ckpt.name} (it has {now['num_patches']} patches "
                f"from {now['n_edits']} edits; the checkpoint {state.get('editor', {}).get('num_patches')} from "
                f"{state.get('editor', {}).get('n_edits')}): load it with "
                f"Editor.load({str(ckpt / 'editor')!r}, model, tokenizer) before resuming"
            )
        if int(state["position"]) > run.n_total:
            raise RunError(
                f"checkpoint {ckpt.name} has already processed {state['position']} requests, more than the "
                f"{run.n_total} asked for now (limit {limit}); resume with a limit of at least "
                f"{state['position']} (or none), or start over with --overwrite (or another --out)")
        run.state = MetricState.from_dict(state["metrics"])
        run.wall_before = float(state.get("wall_seconds", 0.0))
        run.peak_rss_before = float(state.get("peak_rss_mib", 0.0))
        run.last_ckpt_edits = run.state.n_edits
        run.memory = dict(state.get("memory_set") or {})
        _truncate(paths.edits, int(state["edits_bytes"]))
        _truncate(paths.evals, int(state["evals_bytes"]))
        log.info("resuming %s from %s: %d requests done, %d edits, %d patches",
                 out, ckpt.name, run.state.position, run.state.n_edits, run._num_patches())
    else:
        if existing is not None:
            log.info("no checkpoint in %s yet: starting the stream from the beginning", out)
        for p in (paths.edits, paths.evals):
            p.unlink(missing_ok=True)
        for p in (paths.summary_json, paths.summary_csv, paths.activations):
            p.unlink(missing_ok=True)

    # Baseline: reused on resume (it must be of the unedited model).
    base = _read_json(paths.baseline) if (existing is not None and paths.baseline.is_file()) else None
    if base is not None and "retain_size" in existing and existing["retain_size"] != retain_size:
        raise RunError(
            f"cannot resume: the run's TrainR/TestR sets were drawn with retain_size={existing['retain_size']}, "
            f"not {retain_size}; resume with the same value (the CLI's default on --resume), or start over "
            f"with --overwrite (or another --out)")
    if base is not None and base.get("n_records", -1) < run.n_total:
        if ckpt is not None:
            raise RunError(
                f"the run's pre-edit baseline covers {base['n_records']} requests, fewer than the "
                f"{run.n_total} asked for now (a larger --limit); the unedited model is needed to "
                f"extend it: start a new run (--overwrite or another --out) instead"
            )
        base = None
    if base is None:
        if retain_pairs is None:
            retain_pairs = [p for r in records for p in r.locality]
        base = run.compute_baseline(retain_pairs, retain_size, retain_sets)
        write_json_atomic(paths.baseline, base, indent=None)
    run.baseline = base
    write_json_atomic(paths.run_json, info)

    if ckpt is None and memory_texts:
        t0 = time.perf_counter()
        n_vec = editor.build_memory(list(memory_texts))
        run.memory = {"texts": len(memory_texts), "vectors": int(n_vec), "seconds": round(time.perf_counter() - t0, 3)}
        log.info("memory: %d texts -> %s FFN-input vectors (%.1fs)", len(memory_texts), n_vec, run.memory["seconds"])

    # ------------------------------------------------------------------- the loop
    run.edits_fh = open(paths.edits, "a", encoding="utf-8")
    run.evals_fh = open(paths.evals, "a", encoding="utf-8")
    try:
        if ckpt is None and run.state.n_edits == 0 and not run.state.evals:
            zero = run.state.record_eval({
                "TrainR": 1.0 if base["train"] else None,
                "TestR": 1.0 if base.get("test_accuracy") else None,
            })
            run._write_line(run.evals_fh, {**zero, "SR": None, "GR": None, "patches": run._num_patches()})
        _loop(run, info)
        st = run.state
        if not st.evals or st.evals[-1].get("position") != st.position or "Gen" not in st.evals[-1]:
            run.evaluate(final=True)
        if run.last_ckpt_edits != st.n_edits or latest_checkpoint(out) is None or _ckpt_position(out) != st.position:
            run.checkpoint(info)
        complete = st.position >= run.n_total
    finally:
        run.edits_fh.close()
        run.evals_fh.close()

    # -------------------------------------------------------------------- outputs
    _save_activations(run, heatmap_max_edits)  # kept even without plots: `fastpatch report` draws it
    summary = build_summary(run, info, complete=complete)
    report.write_summary(out, summary)
    if plots:
        try:
            report.render_plots(out)
        except Exception as err:  # noqa: BLE001 - plots never fail a finished run
            log.warning("could not render plots: %s", err)
    return summary


def classification_labels(
    editor: Any,
    records: Sequence[EditRecord],
    extra_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, int] | None:
    """For a classifier editor (``editor.task == "cls"``): ``{target text: class index}`` over
    every target of ``records`` (their locality answers included) and of ``extra_pairs``; None
    for a generative editor.

    Targets name classes through the model's ``config.label2id`` (``"true"``), or give the index
    as text (``"1"``); a record's ``label`` field, when present, must agree with its target.

    Raises:
        RunError: a target that is not a class of this classifier, an index out of range, a label
            that contradicts its target, or classification records (``label``) for a generative
            model. The message names the request id.
    """
    from .data.formats import resolve_label

    task = getattr(editor, "task", None)
    if task != "cls":
        bad = next((r for r in records if getattr(r, "label", None) is not None), None)
        if bad is not None:
            raise RunError(
                f"request {bad.id!r} is a classification request (label {bad.label}) but the model is a "
                f"{task or 'generative'} model: run classification streams on a sequence classifier "
                f"(e.g. --model minilm --data claims)")
        return None
    cfg = getattr(getattr(editor, "model", None), "config", None)
    num_labels = int(getattr(cfg, "num_labels", 2))
    label2id = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
    out: dict[str, int] = {}

    def index(value: str, where: str) -> int:
        if value not in out:
            try:
                out[value] = resolve_label(value, label2id, num_labels)
            except ValueError as err:
                raise RunError(f"{where}: {err}") from None
        return out[value]

    for r in records:
        got = index(r.target, f"request {r.id!r} (row {r.source_row})")
        label = getattr(r, "label", None)
        if label is not None:
            try:
                want = resolve_label(int(label), label2id, num_labels)
            except ValueError as err:
                raise RunError(f"request {r.id!r} (row {r.source_row}): {err}") from None
            if want != got:
                raise RunError(f"request {r.id!r} (row {r.source_row}): target {r.target!r} is class {got} "
                               f"but its label field says {label}")
        for p, a in r.locality:
            index(a, f"request {r.id!r} (row {r.source_row}), locality prompt {p!r}")
    for p, a in extra_pairs:
        index(a, f"retain pair {p!r}")
    return out


def _ckpt_position(out: Path) -> int | None:
    ck = latest_checkpoint(out)
    if ck is None:
        return None
    return int(_read_json(ck / "state.json").get("position", -1))


def check_resume(existing: dict[str, Any], fingerprints: dict[str, Any]) -> None:
    """Raise :class:`RunMismatchError` if a run's stored fingerprints differ from these."""
    old = existing.get("fingerprints", {})
    if not _same_model(old.get("model", {}), fingerprints["model"]):
        raise RunMismatchError(
            f"cannot resume: the run was made with model {old.get('model', {}).get('name')!r}"
            f"{' (config ' + str(old.get('model', {}).get('config_sha256'))[:12] + ')' if old.get('model', {}).get('config_sha256') else ''}"
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


def _clear_run(paths: RunPaths) -> None:
    for p in (paths.run_json, paths.baseline, paths.edits, paths.evals, paths.summary_json, paths.summary_csv,
              paths.activations):
        p.unlink(missing_ok=True)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)


def _loop(run: _Run, info: dict[str, Any]) -> None:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    st, recs = run.state, run.records
    bar = tqdm(total=run.n_total, initial=min(st.position, run.n_total), unit="req", dynamic_ncols=True,
               disable=not run.progress, desc="editing", smoothing=0.1)
    try:
        with logging_redirect_tqdm() if run.progress else contextlib.nullcontext():
            while st.position < run.n_total:
                i = st.position
                line = _process(run, i, recs[i])
                run._write_line(run.edits_fh, line)
                if run.on_record is not None:
                    run.on_record(line)
                bar.update(1)
                bar.set_postfix(edits=st.n_edits, SR=_fmt(st.sr), GR=_fmt(st.gr), patches=run._num_patches(),
                                refresh=False)
                if line["action"] == "edit":
                    if run.eval_every and st.n_edits % run.eval_every == 0:
                        run.evaluate()
                    if st.n_edits % run.checkpoint_every == 0:
                        run.checkpoint(info)
    finally:
        bar.close()


def _process(run: _Run, i: int, r: EditRecord) -> dict[str, Any]:
    """Edit (or skip) one request; update the metric state; return its edits.jsonl line.

    The editor checks the request first (``EditResult.already_correct``: no patch, model
    unchanged); under the T-Patcher protocol such a request is a skip, not an edit.
    """
    from .editor import EditError, EditRequest

    ed, st = run.ed, run.state
    if run.labels is not None:  # a classifier: the label the target names (validated up front)
        req = EditRequest(prompt=r.prompt, label=run.labels[r.target], edit_id=str(r.id), rephrases=list(r.rephrases))
    else:
        req = EditRequest(prompt=r.prompt, target=r.target, edit_id=str(r.id), rephrases=list(r.rephrases))
    t0 = time.perf_counter()
    error = None
    try:
        res = ed.edit(req)
    except EditError as err:
        res, error = None, str(err)
        log.warning("request %s (row %d) could not be edited: %s", r.id, r.source_row, err)
    seconds = time.perf_counter() - t0
    if run.protocol == "tpatcher" and res is not None and res.already_correct:
        st.record_skip()
        return {"i": i, "id": r.id, "action": "skip", "reason": "already_correct",
                "seconds": round(seconds, 4), "edits": st.n_edits, "metrics": st.current()}
    # Post-edit checks: the prompt and its paraphrases, in one batch.
    prompts = [r.prompt] + list(r.rephrases)
    t1 = time.perf_counter()
    ok = run.check_pairs([(p, r.target) for p in prompts])
    st.check_seconds += time.perf_counter() - t1
    st.record_edit(
        i, success=ok[0], paraphrases=ok[1:], seconds=seconds,
        n_neurons=res.n_neurons if res is not None else 0,
        editor_success=res.success if res is not None else False,
        already_correct=bool(res.already_correct) if res is not None else False,
    )
    line: dict[str, Any] = {
        "i": i, "id": r.id, "action": "edit", "success": ok[0],
        "gr": (sum(ok[1:]) / len(ok[1:])) if len(ok) > 1 else None,
        "seconds": round(seconds, 4),
    }
    if req.label is not None:
        line["label"] = req.label  # the class the edit teaches (classifiers)
    if res is not None:
        d = res.to_dict()
        line.update({
            "editor_success": d.get("success"), "steps": d.get("steps"), "editor_seconds": d.get("seconds"),
            "patch_ids": d.get("patch_ids"), "n_neurons": d.get("n_neurons"),
            "already_correct": d.get("already_correct"), "kept_failed": d.get("kept_failed"),
            "losses": d.get("losses"),
        })
    else:
        line.update({"editor_success": False, "steps": 0, "patch_ids": [], "n_neurons": 0, "error": error})
    line.update({"edits": st.n_edits, "patches": run._num_patches(), "metrics": st.current()})
    return line


def _save_activations(run: _Run, max_edits: int) -> None:
    import numpy as np

    st = run.state
    idx = st.edited[:max_edits]
    if not idx or run._num_patches() <= 0:
        run.paths.activations.unlink(missing_ok=True)
        return
    try:
        acts = run.ed.activations([run.records[i].prompt for i in idx])
        arr = acts.detach().float().cpu().numpy() if hasattr(acts, "detach") else np.asarray(acts, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - the heatmap is optional
        log.warning("could not compute patch activations for the heatmap: %s", err)
        return
    tmp = run.paths.activations.with_name(".activations.tmp.npz")
    np.savez_compressed(tmp, activations=arr, rows=np.asarray(idx), ids=np.asarray([run.records[i].id for i in idx]))
    os.replace(tmp, run.paths.activations)


def build_summary(run: _Run, info: dict[str, Any], complete: bool) -> dict[str, Any]:
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
        "editor_success_rate": (st.n_editor_success / st.n_edits) if st.n_edits else None,
        "patches": run._num_patches(),
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
        "memory_set": {k: run.memory.get(k) for k in ("texts", "vectors")},
        "peak_memory": {"rss_mib": max(run.peak_rss_before, mem["peak_rss_mib"] or 0.0),
                        "cuda_mib": mem["peak_cuda_mib"]},
        "retain_sets": {"train": len(run.baseline.get("train", [])),
                        "train_candidates": run.baseline.get("train_candidates"),
                        "test": len(run.baseline.get("test", [])),
                        "test_pre_accuracy": run.baseline.get("test_accuracy")},
        "skipped_rows": info.get("skipped_rows", []),
        "versions": versions(),
        "editor_config": _editor_config(run.ed),
        "run": {k: v for k, v in info.items() if k not in ("skipped_rows",)},
    }


def _editor_config(ed: Any) -> dict[str, Any] | None:
    cfg = getattr(ed, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            return cfg.to_dict()
        except Exception:  # noqa: BLE001
            return None
    return None
