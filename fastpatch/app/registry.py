"""The demo app's one registry: a name (``smollm2``, ``minilm``, ``geography``, ``claims``) or a
path resolves to a typed model or stream object.

    from fastpatch.app import registry
    model, tokenizer = registry.resolve_model("smollm2")
    stream = registry.load_data("geography")        # a Stream: records, memory corpus, retain sets

The CLI and ``make demo`` go through here; the library (editor, runner, formats) never does: it
takes models and records, not names. A new built-in model is one :class:`BuiltinModel` in
:data:`MODELS`; a new built-in stream one :class:`BuiltinStream` in :data:`STREAMS`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..data.formats import EditRecord, StreamLoad

__all__ = [
    "MODELS",
    "STREAMS",
    "BuiltinModel",
    "BuiltinStream",
    "EditorPreset",
    "RegistryError",
    "SMOLLM2_PRESET",
    "Stream",
    "check_pairing",
    "default_data",
    "default_memory_corpus",
    "find_model",
    "find_stream",
    "load_data",
    "model_identity",
    "resolve_model",
]

log = logging.getLogger("fastpatch.app")

#: Tasks of built-in models and streams (a generative stream needs a language model, a
#: classification stream a sequence classifier).
GENERATIVE = "generative"
CLASSIFICATION = "classification"


class RegistryError(ValueError):
    """A name or pairing the registry refuses (the message says what to use instead)."""


@dataclass
class Stream:
    """An edit stream ready for :func:`fastpatch.run.run_stream`, with what the run needs beside it.

    Attributes:
        records: the requests (a :class:`~fastpatch.data.formats.StreamLoad` for a file, whose
            skipped rows the summary reports).
        data_id: what run.json records about the data (name, or file fingerprint and format).
        memory: the stream's own T-Patcher memory corpus, or None (files: see
            :func:`default_memory_corpus`).
        retain_pairs: locality pairs the runner splits into TrainR/TestR sets, or None (every
            locality pair of the stream).
        retain_sets: the TrainR candidates and TestR set given explicitly, or None.
        task: :data:`GENERATIVE`, :data:`CLASSIFICATION`, or None when unknown (a file).
        all_memory: use the whole memory corpus by default (its vectors are cheap).
    """

    records: Sequence[EditRecord] | StreamLoad
    data_id: dict[str, Any]
    memory: list[str] | None = None
    retain_pairs: list[tuple[str, str]] | None = None
    retain_sets: tuple[list[tuple[str, str]], list[tuple[str, str]]] | None = None
    task: str | None = None
    all_memory: bool = False

    @property
    def edit_records(self) -> Sequence[EditRecord]:
        """The requests themselves (``records``, or a ``StreamLoad``'s ``.records``)."""
        return getattr(self.records, "records", self.records)


@dataclass(frozen=True)
class EditorPreset:
    """How a built-in model is edited unless told otherwise: the FFN to patch (None: the family's
    last) and :class:`~fastpatch.editor.EditorConfig` fields. ``fastpatch run`` applies a preset
    when ``--module-path`` is not given; ``--set`` overrides single fields of it."""

    module_path: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class BuiltinModel:
    """A model the app ships: its name, aliases, task and loader (``dtype -> (model, tokenizer)``)."""

    name: str
    aliases: frozenset[str]
    task: str
    load: Callable[[torch.dtype], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    default_stream: str | None = None
    #: logged before a load that may take a while
    note: str | None = None
    #: the editor settings it is edited with by default
    preset: EditorPreset = EditorPreset()


@dataclass(frozen=True)
class BuiltinStream:
    """A stream the app ships: its name, task and loader."""

    name: str
    task: str
    load: Callable[[], Stream]
    aliases: frozenset[str] = field(default_factory=frozenset)


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from .models import load_smollm2

    return load_smollm2(dtype=dtype)


def _load_minilm(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from .classifier import load_minilm_classifier

    return load_minilm_classifier(dtype=dtype)


def _geography() -> Stream:
    from .geography import geography_records, split_memory_and_locality

    memory, locality = split_memory_and_locality()
    return Stream(geography_records(), {"name": "geography"}, memory=memory, retain_pairs=locality, task=GENERATIVE)


def _claims() -> Stream:
    from .claims import claims_data, claims_records

    data = claims_data()
    return Stream(claims_records(data), {"name": "claims", "seed": data.seed, "claims_sha256": data.fingerprint},
                  memory=data.memory, retain_sets=(data.train_retain, data.test_retain), task=CLASSIFICATION,
                  all_memory=True)


#: SmolLM2's editor preset: one neuron per edit in the MLP of layer 18 of 30, its key read at the
#: last token of the record's subject. Chosen on the first 200 edits of zsRE and CounterFact
#: against the authors' last FFN and last-token key, layers 26/22 and key_position="both"
#: (benchmarks/results/cpu/ablations.md), and run to T = 1,000 on both (docs/results.md). It costs
#: the capitals' declarative paraphrase and time per edit (eleven layers in the deep tail), where
#: the last FFN is faster and "both" keeps the paraphrase (docs/results.md, Known gaps).
SMOLLM2_PRESET = EditorPreset("model.layers.18.mlp", (("key_position", "subject"),))

MODELS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("smollm2", frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"}), GENERATIVE,
                 _load_smollm2, preset=SMOLLM2_PRESET),
    BuiltinModel("minilm", frozenset({"minilm", "all-minilm-l6-v2", "minilm-l6"}), CLASSIFICATION, _load_minilm,
                 default_stream="claims",
                 note="loading the MiniLM claim classifier (trained and cached at first use: about a minute)"),
)}
STREAMS: dict[str, BuiltinStream] = {s.name: s for s in (
    BuiltinStream("geography", GENERATIVE, _geography),
    BuiltinStream("claims", CLASSIFICATION, _claims),
)}


def find_model(name: str | os.PathLike[str]) -> BuiltinModel | None:
    """The built-in model a name (or alias, any case) names, or None (a path)."""
    key = os.fspath(name).strip().lower()
    return next((m for m in MODELS.values() if key in m.aliases), None)


def find_stream(name: str) -> BuiltinStream | None:
    """The built-in stream a name (any case) names, or None (a file)."""
    key = name.strip().lower()
    return next((s for s in STREAMS.values() if key == s.name or key in s.aliases), None)


def resolve_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A built-in model name or a local path -> ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ValueError: not a known name and not an existing directory or ``.gguf`` file.
        ModelNotInstalledError: the package holding a built-in model's weights is missing.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    builtin = find_model(name_or_path)
    if builtin is not None:
        return builtin.load(dtype)
    from .models import load_pretrained

    return load_pretrained(name_or_path, dtype=dtype)


def model_identity(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model for resume: a built-in model's canonical name (aliases name the
    same model), else :func:`fastpatch.run.model_fingerprint` of the path."""
    builtin = find_model(name_or_path)
    if builtin is not None:
        return {"name": builtin.name}
    from ..run import model_fingerprint

    return model_fingerprint(name_or_path)


def default_data(model: str) -> str:
    """The stream a model runs on when ``--data`` is not given.

    Raises:
        RegistryError: the model has no default stream.
    """
    builtin = find_model(model)
    if builtin is None or builtin.default_stream is None:
        with_default = "; ".join(f"only --model {m.name} has a default, '{m.default_stream}'"
                                 for m in MODELS.values() if m.default_stream)
        raise RegistryError(f"--data is required: {', '.join(repr(s) for s in STREAMS)} or an edit-stream file "
                            f"({with_default})")
    return builtin.default_stream


def check_pairing(model: str, data: str) -> None:
    """Refuse a built-in model with a built-in stream of the other task (a classifier on a
    generative stream, or a language model on a classification stream).

    Raises:
        RegistryError: the message says which model or stream to use instead.
    """
    m, s = find_model(model), find_stream(data)
    if m is None or s is None or m.task == s.task:
        return
    if m.task == CLASSIFICATION:
        raise RegistryError(
            f"--model {m.name} is a true/false claim classifier and --data {s.name} a generative stream "
            f"(capital-city continuations): use --data {m.default_stream} (the default for {m.name}), or a "
            f"generative model such as --model smollm2 for {s.name}")
    raise RegistryError(f"--data {s.name} is a classification stream (true/false labels): it needs a sequence "
                        f"classifier such as --model minilm, not {m.name}")


def load_data(name_or_path: str, fmt: str = "auto", skip_bad: bool = False) -> Stream:
    """A built-in stream name or an edit-stream file -> :class:`Stream`.

    Raises:
        RegistryError: not a built-in name and not a file, or a file without requests.
        StreamFormatError: a malformed file (unless ``skip_bad``).
    """
    builtin = find_stream(name_or_path)
    if builtin is not None:
        return builtin.load()
    from ..data.formats import load_stream
    from ..run import file_fingerprint

    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = " / ".join(f"--data {s}" for s in STREAMS)
        raise RegistryError(f"--data {name_or_path!r}: no such file (or use {names})")
    loaded = load_stream(path, fmt=fmt, skip_bad=skip_bad)
    if loaded.skipped:
        log.warning("%s: skipped %d malformed row(s) (--skip-bad), e.g. row %d field %r: %s", path,
                    len(loaded.skipped), *loaded.skipped[0])
    if not loaded.records:
        raise RegistryError(f"--data {name_or_path!r}: no edit requests in the file")
    log.info("%s: %d requests (%s format)", path, len(loaded.records), loaded.format)
    data_id = {**file_fingerprint(path), "format": loaded.format, "skip_bad": bool(skip_bad)}
    return Stream(loaded, data_id)


def default_memory_corpus() -> list[str] | None:
    """The memory corpus for a file stream with ``--memory auto``: the built-in FanOutQA and
    continent prompts, or None when their packages are not installed."""
    try:
        from .geography import split_memory_and_locality

        return split_memory_and_locality()[0]
    except ImportError as err:
        log.warning("no memory corpus (%s); T-Patcher's memory loss is off. Pass --memory FILE", err)
        return None


def default_ability_sets(stream: Stream) -> tuple[list[str], list[tuple[str, str]]] | None:
    """The general-ability texts and questions of a run (see :mod:`fastpatch.run.scores`): for a
    generative file stream, the built-in geography/FanOutQA sets
    (:func:`fastpatch.app.geography.general_ability_sets`); None for the built-in streams (their
    own retain sets already are such questions) and classifiers, or when the packages are missing."""
    if stream.memory is not None or stream.task == CLASSIFICATION:
        return None
    try:
        from .geography import general_ability_sets

        return general_ability_sets()
    except ImportError as err:
        log.warning("no general-ability sets (%s): PPL and Ability are not reported", err)
        return None
