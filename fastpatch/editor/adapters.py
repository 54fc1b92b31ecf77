"""Family adapters: where the last FFN is, how a request becomes token positions, and what the
model computes after the patched FFN (the "tail") so a training step can skip everything below.

The tail starts at a module whose *input* is the residual state right after the FFN output is
added (``s0``). Patches add ``delta = act(x K^T + b) V`` to the FFN output, so after an edit the
tail sees ``s0 + delta`` — position-wise, for the last layer of every supported family. A
training step therefore re-runs only ``tail(s0 + delta)`` at the positions the loss reads.
An earlier MLP of a Llama-like model (``module_path="model.layers.26.mlp"``) gets the deep tail
(:mod:`.deep_tail`): the layers after it, re-run over every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..ffn import SUPPORTED_LAYOUTS, UnknownLayoutError, resolve_module
from .encoding import TaskEncoder, encoder_for

__all__ = ["FamilyAdapter", "find_adapter", "SUPPORTED_FAMILIES"]

_LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "bert", "bart", "mbart", "t5")


def _linear_head(linear: nn.Module, softcap: float | None = None, extra_bias: torch.Tensor | None = None
                 ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``(h, idx) -> logits`` of an output projection, over the rows ``idx`` only (None: all)."""

    def head(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        w, b = linear.weight, getattr(linear, "bias", None)
        if extra_bias is not None:
            b = extra_bias if b is None else b + extra_bias
        if idx is not None:
            w = w[idx]
            b = b[idx] if b is not None else None
        logits = torch.nn.functional.linear(h, w, b)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return head


@dataclass
class FamilyAdapter:
    """How the editor drives one model family.

    Attributes:
        family: model_type-like name.
        task: ``causal`` (decoder-only LM), ``seq2seq`` (encoder-decoder LM), ``mlm`` (masked LM)
            or ``cls`` (sequence classifier, read at [CLS]).
        ffn_path: dotted path of the last FFN (or of its layer for split layouts).
        tail_input: dotted path of the module whose input is ``s0``; None disables the fast path.
        tail: ``s (n, d) -> logits (n, vocab or labels)``.
        features: LM heads only: ``s -> h``, the tail up to the output projection, so that
            ``tail(s) == head(features(s), None)``.
        head: ``(h, idx) -> logits`` over the vocabulary rows ``idx`` only (``None``: all). The
            editor's candidate-vocabulary loss (``EditorConfig.loss_vocab``) needs both.
        seq_layers: the deep tail (:mod:`.deep_tail`), for an FFN before the last layer: the
            decoder layers after it, re-run over every position; ``tail_input`` is then the first
            of them, ``features`` the final norm, and ``tail`` is None.
    """

    family: str
    task: str
    ffn_path: str
    tail_input: str | None
    tail: Callable[[torch.Tensor], torch.Tensor] | None
    features: Callable[[torch.Tensor], torch.Tensor] | None = None
    head: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    seq_layers: Sequence[nn.Module] | None = None

    @property
    def fast_path(self) -> bool:
        """A tail is known: a training step can re-run only what comes after the FFN."""
        return (self.tail is not None or self.deep) and self.tail_input is not None

    @property
    def deep(self) -> bool:
        """The patched FFN is before the last layer: the tail re-runs the layers after it."""
        return self.seq_layers is not None

    @property
    def encoder(self) -> TaskEncoder:
        """How requests become inputs and label positions for this family's task."""
        return encoder_for(self.task)


def _has(model: nn.Module, path: str) -> bool:
    try:
        resolve_module(model, path)
        return True
    except (KeyError, ValueError):
        return False


def _llama_like(model: nn.Module, family: str, layer_index: int = -1) -> FamilyAdapter:
    cfg = model.config
    layers = model.model.layers
    layer = layers[layer_index]
    softcap = getattr(cfg, "final_logit_softcapping", None)
    # Gemma-2/3 normalise the MLP output before the residual add: s0 + delta is then not what the
    # tail sees, so these use the generic (full forward) path.
    linear_residual = not hasattr(layer, "post_feedforward_layernorm")

    head = _linear_head(model.lm_head, softcap)

    def tail(s: torch.Tensor) -> torch.Tensor:
        return head(model.model.norm(s), None)

    if not linear_residual:
        return FamilyAdapter(family, "causal", "model.layers.-1.mlp", None, None)
    i = layer_index % len(layers)
    if i < len(layers) - 1:
        # The deep tail replays the mask the model passed to layer i + 1 on every later layer:
        # only when they all attend alike (no sliding-window / full mix).
        types = getattr(cfg, "layer_types", None)
        if types is not None and len(set(types[i + 1 :])) > 1:
            return FamilyAdapter(family, "causal", f"model.layers.{i}.mlp", None, None)
        return FamilyAdapter(family, "causal", f"model.layers.{i}.mlp", f"model.layers.{i + 1}", None,
                             model.model.norm, head, seq_layers=list(layers[i + 1 :]))
    return FamilyAdapter(family, "causal", "model.layers.-1.mlp", "model.norm", tail, model.model.norm, head)


def _gpt2(model: nn.Module) -> FamilyAdapter:
    return FamilyAdapter("gpt2", "causal", "transformer.h.-1.mlp", "transformer.ln_f",
                         lambda s: model.lm_head(model.transformer.ln_f(s)), model.transformer.ln_f,
                         _linear_head(model.lm_head))


def _bert(model: nn.Module) -> FamilyAdapter:
    ln = model.bert.encoder.layer[-1].output.LayerNorm
    if hasattr(model, "classifier"):  # BertForSequenceClassification
        pooler = model.bert.pooler
        if pooler is None:
            raise UnknownLayoutError("BERT sequence classifier without a pooler is not supported")

        def cls_tail(s: torch.Tensor) -> torch.Tensor:
            h = ln(s)
            return model.classifier(model.dropout(pooler.activation(pooler.dense(h))))

        return FamilyAdapter("bert", "cls", "bert.encoder.layer.-1", "bert.encoder.layer.-1.output.LayerNorm", cls_tail)
    if hasattr(model, "cls"):  # BertForMaskedLM
        return FamilyAdapter("bert", "mlm", "bert.encoder.layer.-1", "bert.encoder.layer.-1.output.LayerNorm",
                             lambda s: model.cls(ln(s)))
    raise UnknownLayoutError(f"{type(model).__name__}: BERT needs a masked-LM or sequence-classification head")


def _bart(model: nn.Module, family: str) -> FamilyAdapter:
    dec = model.model.decoder
    final_ln = getattr(dec, "layer_norm", None)  # mBART

    bias = getattr(model, "final_logits_bias", None)
    head = _linear_head(model.lm_head, extra_bias=bias[0] if bias is not None else None)

    def features(s: torch.Tensor) -> torch.Tensor:
        h = dec.layers[-1].final_layer_norm(s)
        return final_ln(h) if final_ln is not None else h

    return FamilyAdapter(family, "seq2seq", "model.decoder.layers.-1", "model.decoder.layers.-1.final_layer_norm",
                         lambda s: head(features(s), None), features, head)


def _t5(model: nn.Module) -> FamilyAdapter:
    cfg = model.config
    scale = cfg.d_model**-0.5 if getattr(cfg, "tie_word_embeddings", True) else 1.0

    head = _linear_head(model.lm_head)

    def features(s: torch.Tensor) -> torch.Tensor:
        return model.decoder.dropout(model.decoder.final_layer_norm(s)) * scale

    return FamilyAdapter("t5", "seq2seq", "decoder.block.-1.layer.-1", "decoder.final_layer_norm",
                         lambda s: head(features(s), None), features, head)


def find_adapter(model: nn.Module, module_path: str | None = None) -> FamilyAdapter:
    """The adapter for ``model``; ``module_path`` overrides where the FFN is.

    An unknown family with an explicit path gets a generic adapter (full-forward training path).
    An unknown family without a path raises ``UnknownLayoutError`` listing the supported ones.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    adapter: FamilyAdapter | None = None
    if mt in _LLAMA_LIKE and _has(model, "model.layers.-1.mlp") \
            and hasattr(model, "lm_head"):
        adapter = _llama_like(model, mt)
    elif mt == "gpt2" and hasattr(model, "lm_head"):
        adapter = _gpt2(model)
    elif mt == "bert" and hasattr(model, "bert"):
        adapter = _bert(model)
    elif mt in ("bart", "mbart") and hasattr(model, "lm_head"):
        adapter = _bart(model, mt)
    elif mt == "t5" and hasattr(model, "lm_head"):
        adapter = _t5(model)
    if adapter is None:
        if module_path is None:
            raise UnknownLayoutError(
                f"don't know where the last FFN of {type(model).__name__} (model_type={mt!r}) is. "
                f"Supported families: {', '.join(SUPPORTED_FAMILIES)}; FFN layouts: {'; '.join(SUPPORTED_LAYOUTS)}. "
                "Pass module_path='...' to name the FFN explicitly."
            )
        is_s2s = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        return FamilyAdapter(mt or type(model).__name__, "seq2seq" if is_s2s else "causal", module_path, None, None)
    if module_path is not None and resolve_module(model, module_path)[1] != resolve_module(model, adapter.ffn_path)[1]:
        # A different FFN than the last one: the tail no longer starts right after it. An
        # earlier MLP of a Llama-like model gets the deep tail; anything else the full forward.
        canon = resolve_module(model, module_path)[1]
        layer = _llama_layer_of(model, canon) if adapter.seq_layers is None and adapter.tail is not None \
            and adapter.family in _LLAMA_LIKE else None
        if layer is not None:
            return _llama_like(model, adapter.family, layer)
        adapter = FamilyAdapter(adapter.family, adapter.task, module_path, None, None)
    return adapter



def _llama_layer_of(model: nn.Module, canon: str) -> int | None:
    """The index ``i`` when ``canon`` is ``model.layers.{i}.mlp`` (canonical), else None."""
    parts = canon.split(".")
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" and parts[2].isdigit():
        return int(parts[2])
    return None
