"""Requests, results and configuration of the T-Patcher editor."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["EditRequest", "EditResult", "EditorConfig", "EditError", "MethodSettings", "RuntimeOptions"]


class EditError(ValueError):
    """A request or configuration the editor cannot act on (the model is left untouched)."""


@dataclass
class EditRequest:
    """One edit.

    Generative models: ``prompt`` and ``target`` (the continuation, or for seq2seq models the
    output). Classifiers: ``prompt`` (the input) and ``label`` (class index).
    ``rephrases`` are optional paraphrases (used by the runner's GR metric, not by training).
    ``subject`` (the entity the fact is about, as it appears in the prompt) lets the editor build
    hard negatives (``EditorConfig.negatives``): the prompt about other subjects; ``ground_truth``
    (the old answer) is what those negatives are read with.
    """

    prompt: str
    target: str | None = None
    label: int | None = None
    edit_id: str | None = None
    rephrases: list[str] = field(default_factory=list)
    subject: str | None = None
    ground_truth: str | None = None


@dataclass
class EditResult:
    """What one edit did."""

    edit_id: str
    success: bool
    steps: int
    seconds: float
    patch_ids: list[int]
    losses: dict[str, float]
    n_neurons: int
    already_correct: bool = False
    kept_failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dict (an edits.jsonl line's editor fields)."""
        return asdict(self)


#: Seed words of the generated context prefixes (``EditorConfig.augment``), MEMIT's choice plus
#: three more: short, neutral sentence starts.
CONTEXT_SEEDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You", "It", "In", "When")
#: Seeds of the subject-context views (``MethodSettings.subject_context``): ``{s}`` is the subject.
SUBJECT_SEEDS: tuple[str, ...] = ("{s}", "About {s},", "I read about {s}")


@dataclass
class MethodSettings:
    """T-Patcher's own settings: what the patches are and how they are trained (../docs: tpatcher.md).

    The losses, their weights and the optimiser are the authors'. Seven defaults go beyond them
    (:meth:`EditorConfig.authors` turns all seven off): the memory-whitened key init, the
    gradient value init with its amplifier search, the context variants (``augment``), the
    candidate-vocabulary loss (``loss_vocab``, a runtime option), up to 10 neurons per edit
    instead of 5, hard negatives (``negatives``) and phrasing views (``phrasings``). On SmolLM2's 144 wrong capitals the first
    five take question-paraphrase generalisation from 0.63 to 0.97 at the same locality; on the
    first 200 CounterFact edits the hard negatives take locality from 0.70 to 0.89 with the
    held-out perplexity unchanged (benchmarks/results/cpu/ablations.md).

    Attributes:
        alc: weight of the activation loss L_act.
        mlc: weight of the memory loss L_m1 + L_m2 (authors: 10 generative, 5 classification).
        act_topk: L_act is the mean of the top-k of exp(-a_e).
        mem_topk: L_m1/L_m2 are means of the top-k memory terms.
        margin: the +3 margin of L_m1 and L_m2.
        lr / weight_decay / grad_clip: Adam settings.
        max_steps: give up after this many steps (the edit then fails).
        max_neurons: generative edits get one neuron per wrong target position, at most this many
            (authors: 5). 10 covers nearly every zsRE target: with 5, 5% of the first 100 zsRE
            edits (targets of 6-9 tokens) never converged; with 10 all did, at the same locality.
        label_smoothing: of the generative edit loss (NLL).
        init: ``"authors"`` (k = q/||q||^2, b = 0) or ``"memory"`` (key pointed away from the
            memory mean and bias set from the memory's pre-activations, so the patch starts firing
            on the edit and silent on the memory).
        value_init: ``"random"`` (authors: random direction times an amplifier) or ``"unembed"``
            (along the target token's output embedding minus the predicted one's, with the
            amplifier doubled until the edit is predicted right: a few tail-only evaluations), or
            ``"gradient"`` (along the descent direction of the edit loss at the tail input over
            every view, then the same amplifier search). ``"gradient"`` and the amplifier search
            need the fast path: without it (``fast_path=False``, or a family without a tail
            adapter) ``"gradient"`` falls back to ``"unembed"`` without the search, and the
            editor logs so once. Classifiers always use ``"random"`` (there is no unembedding).
        amplifier: initial value amplifier (authors: 10).
        value_margin: with ``value_init="unembed"``/``"gradient"``, the amplifier found to make the
            edit right is multiplied by this, so paraphrases on which the patch fires less strongly
            flip too.
        amplifier_fallback: where the amplifier search ends when no doubling (up to ``2**9``
            times ``amplifier``) makes the edit right: ``"max"`` (``2**10`` times it, where the
            doubling loop stops) or ``"lowest_loss"`` (the doubling with the lowest edit loss on
            the requests as given; training takes it from there).
        augment: causal LMs only: also train each patch on the edit prompt behind this many
            short context prefixes that the model itself generates once (greedy, from fixed seed
            words; MEMIT's "context templates"). The patch must fire, and the target must win, on
            every variant (within ``augment_patience``; success is still decided on the request
            as given), so neither key nor value hinge on how the text starts; question-form
            paraphrases then flip too. The key init also whitens by the variants' own scatter, so
            the patch fires about equally on each. 0 is the authors' behaviour (the edit input only).
        augment_tokens: length, in tokens, of each generated context prefix.
        augment_patience: once every request is right as given and the memory margins hold, at
            most this many more steps are spent making every context variant right.
        negatives: causal LMs: per edit, this many hard negatives, the edit prompt with another
            subject in place of its own (subjects of earlier requests that named theirs), read
            with the request's ``ground_truth`` (else its target). Their FFN inputs from the last
            prompt token on join the memory loss, the key init's memory margin and (with
            ``negative_whiten``) its whitening for that edit only, so the patch must stay silent
            on the same question about other subjects. 0: off (the authors').
        negative_whiten: weight of the negatives' scatter (around the memory mean) added to the
            memory covariance that whitens the key: the key then turns away from what the edit
            shares with its negatives (the relation, the template) towards what is its own.
            Raises paraphrase generalisation, but the patches then fire on held-out text (on
            CounterFact, perplexity 92 -> 237 after 200 edits at weight 4): 0 by default.
        key_boundary: where the memory key init puts the patch's zero, as a fraction of the gap
            between the closest memory row (or hard negative) and the edit's weakest view: 0.5
            starts them at -1 and +1; lower values (closer to the memory) let the patch fire on
            more inputs near the edit, such as paraphrases.
        view_scatter: weight of the context variants' own scatter beside the memory covariance
            when the key is whitened (``init="memory"``): 1 evens the patch's pre-activation
            across the variants; 0 leaves the key the plain discriminant of the variants' mean.
        phrasings: causal LMs: per edit, this many phrasing views: other ways of asking the
            edit's relation, learnt from other requests whose prompts share its template (their
            paraphrases) or from a held-out split (``Editor.add_phrasings``), with the edit's
            subject put in (:mod:`fastpatch.editor.phrasings`). Trained like the context
            variants (pursued, never required). A request's own paraphrases, and any view
            equal to one, are never trained on. 0: off (the authors'). On the first 200 edits,
            4 views take CounterFact's Gen. from 0.015 to 0.055 and locality from 0.948 to 0.966
            (zsRE Gen. 0.350 -> 0.370 at locality 0.989 -> 0.986).
        negative_views: with ``phrasings``, the hard negatives' other subjects go in turn into
            the prompt and each of its phrasing views (the same number of negatives), so the
            patch stays silent on the relation's other wordings about other subjects too, as
            CounterFact's neighbourhood prompts ask them.
        key_position: where a patch's key reads the edit: ``"last"`` (the token before each target
            token, the authors') or ``"subject"`` (the last token of the request's subject in each
            view, one neuron per request; needs the deep tail, i.e. an FFN before the last layer of
            a Llama-like model, so that the patch's output reaches the answer through attention).
            ``"both"``: the last-token neurons and a subject neuron, each kind trained alone; an
            edit succeeds when either kind does and keeps the kinds that succeeded. A request
            whose prompt does not contain its subject keeps the last-token key.
        fire_threshold: each trained patch's threshold is raised to this fraction of its
            activation on its own edit (as given, where its key reads) and its value scaled by
            ``1 / (1 - fire_threshold)``: on the edit it adds exactly what it added before, while an
            input that drives it to less than that fraction adds nothing. A patch read far from
            the answer (a subject key before the last layers) has a large value, so a weak misfire
            on held-out text, inside another name, costs the next token many nats; this removes
            those. A request that the raised threshold would leave wrong as given tries half
            the fraction, then a quarter, then keeps its patches as trained. 0: off (the authors').
        subject_context: causal LMs: per edit, this many views with the subject mentioned before
            the prompt: the model's own greedy continuation of the subject (``augment_tokens``
            tokens, original weights, e.g. "Andorra is a small country. ") put in front of it. A
            question that is restated in its answer ("What is the capital of X? The capital of X
            is") names the subject twice, and a key read at the subject fires more weakly on the
            second mention, which then decides the answer; these views train on it. Trained like the
            context variants (pursued, never required); never one of the request's own
            paraphrases. 0: off (the authors').
        memory_growth: which FFN inputs of a committed edit join the memory set: ``"all"`` (every
            position, the authors'), ``"labels"`` (only the positions its neurons read) or
            ``"none"`` (the memory stays the corpus).
        activation: patch activation, ``"relu"`` or ``"host"``.
        seed: seed of the random value init.
    """

    alc: float = 1.0
    mlc: float = 10.0
    act_topk: int = 5
    mem_topk: int = 1000
    margin: float = 3.0
    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    max_steps: int = 200
    max_neurons: int = 10
    label_smoothing: float = 0.1
    init: str = "memory"
    value_init: str = "gradient"
    amplifier: float = 10.0
    value_margin: float = 2.0
    amplifier_fallback: str = "max"
    augment: int = 4
    augment_tokens: int = 5
    augment_patience: int = 10
    negatives: int = 8
    negative_whiten: float = 0.0
    key_boundary: float = 0.5
    view_scatter: float = 1.0
    phrasings: int = 4
    negative_views: bool = False
    key_position: str = "last"
    fire_threshold: float = 0.0
    subject_context: int = 0
    memory_growth: str = "all"
    activation: str = "relu"
    seed: int = 0


@dataclass
class RuntimeOptions:
    """How the editor runs the method: speed and resource knobs and what to keep.

    Attributes:
        fast_path: re-run only what comes after the patched FFN (needs a family adapter).
        loss_vocab: fast path with an LM head: the edit loss's softmax runs over about this many
            candidate tokens (each target position's top tokens before the edit, plus the
            targets) instead of the whole vocabulary, so a step does not read the whole output
            matrix twice. Every "right" decision (stopping, success, the amplifier search) is
            confirmed over the whole vocabulary first, and a token outside the candidates that
            wins joins them. 0: the whole vocabulary (the authors' loss).
        memory_cap: most FFN-input vectors kept in the memory set.
        keep_failed: keep the patches of an edit that did not converge.
    """

    fast_path: bool = True
    loss_vocab: int = 1024
    memory_cap: int = 40_000
    keep_failed: bool = False


#: Values of ``MethodSettings.key_position``.
KEY_POSITIONS: tuple[str, ...] = ("last", "subject", "both")
#: The values of ``MethodSettings.amplifier_fallback``.
AMPLIFIER_FALLBACKS: tuple[str, ...] = ("max", "lowest_loss")

#: Values of ``MethodSettings.memory_growth``.
MEMORY_GROWTH: tuple[str, ...] = ("all", "labels", "none")

#: Fields of earlier versions that nothing reads any more; dropped when a saved config is loaded.
REMOVED_FIELDS: tuple[str, ...] = ("check_every",)

#: Fields added later, with the value that keeps an older saved config's behaviour: a resumed
#: stream goes on with the method it started with, whatever today's default.
ADDED_FIELDS: dict[str, Any] = {"phrasings": 0, "negative_views": False, "key_position": "last", "fire_threshold": 0.0,
                                 "subject_context": 0, "amplifier_fallback": "max"}


@dataclass
class EditorConfig(RuntimeOptions, MethodSettings):
    """Every knob of the editor: the method's settings (:class:`MethodSettings`) and the runtime
    options (:class:`RuntimeOptions`), given flat (``EditorConfig(max_steps=100, fast_path=False)``).
    """

    def __post_init__(self) -> None:
        self.validate()

    @property
    def method(self) -> MethodSettings:
        """The method's settings alone."""
        return MethodSettings(**{f.name: getattr(self, f.name) for f in fields(MethodSettings)})

    @property
    def runtime(self) -> RuntimeOptions:
        """The runtime options alone."""
        return RuntimeOptions(**{f.name: getattr(self, f.name) for f in fields(RuntimeOptions)})

    def validate(self) -> None:
        """Raise ``EditError`` on negative/NaN weights or unknown options."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
                if isinstance(v, float) and math.isnan(v):
                    raise EditError(f"config.{f.name} is NaN")
                if v < 0:
                    raise EditError(f"config.{f.name} must be >= 0, got {v}")
        for name in ("lr", "max_steps", "max_neurons", "mem_topk", "act_topk", "memory_cap"):
            if getattr(self, name) <= 0:
                raise EditError(f"config.{name} must be > 0, got {getattr(self, name)}")
        if self.augment > len(CONTEXT_SEEDS):
            raise EditError(f"config.augment must be at most {len(CONTEXT_SEEDS)} (one prefix per seed word), got {self.augment}")
        if self.subject_context > len(SUBJECT_SEEDS):
            raise EditError(f"config.subject_context must be at most {len(SUBJECT_SEEDS)} (one view per seed), "
                            f"got {self.subject_context}")
        if self.init not in ("authors", "memory"):
            raise EditError(f"config.init must be 'authors' or 'memory', got {self.init!r}")
        if self.value_init not in ("random", "unembed", "gradient"):
            raise EditError(f"config.value_init must be 'random', 'unembed' or 'gradient', got {self.value_init!r}")
        if self.memory_growth not in MEMORY_GROWTH:
            raise EditError(f"config.memory_growth must be one of {MEMORY_GROWTH}, got {self.memory_growth!r}")
        if self.key_position not in KEY_POSITIONS:
            raise EditError(f"config.key_position must be one of {KEY_POSITIONS}, got {self.key_position!r}")
        if self.amplifier_fallback not in AMPLIFIER_FALLBACKS:
            raise EditError(f"config.amplifier_fallback must be one of {AMPLIFIER_FALLBACKS}, got {self.amplifier_fallback!r}")
        if self.activation not in ("relu", "host"):
            raise EditError(f"config.activation must be 'relu' or 'host', got {self.activation!r}")
        if not 0 < self.key_boundary < 1:
            raise EditError(f"config.key_boundary must be in (0, 1), got {self.key_boundary}")
        if not 0 <= self.fire_threshold < 1:
            raise EditError(f"config.fire_threshold must be in [0, 1), got {self.fire_threshold}")
        if not 0 <= self.label_smoothing < 1:
            raise EditError(f"config.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat (what ``Editor.save`` and the run summary record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditorConfig":
        """A config saved by :meth:`to_dict`: fields later removed (:data:`REMOVED_FIELDS`) are
        ignored, fields it predates (:data:`ADDED_FIELDS`) take the value of its time."""
        return cls(**{**ADDED_FIELDS, **{k: v for k, v in d.items() if k not in REMOVED_FIELDS}})

    @classmethod
    def authors(cls, **overrides: Any) -> "EditorConfig":
        """The authors' exact setup: k = q/||q||^2, b = 0, random value times amplifier 10,
        trained on the edit input alone over the whole vocabulary, at most 5 neurons per edit
        (the seven defaults of :class:`MethodSettings` that go beyond the paper, off)."""
        return cls(**{"init": "authors", "value_init": "random", "augment": 0, "loss_vocab": 0, "max_neurons": 5,
                      "negatives": 0, "negative_whiten": 0.0, "memory_growth": "all", "phrasings": 0,
                      "negative_views": False, "key_position": "last", "fire_threshold": 0.0,
                      "subject_context": 0, **overrides})
