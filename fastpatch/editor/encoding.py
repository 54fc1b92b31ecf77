"""Per-task encoding: how a request becomes model inputs and the positions the loss reads.

One :class:`TaskEncoder` per task (``causal``, ``seq2seq``, ``mlm``, ``cls``); a family adapter
names its task and :func:`encoder_for` gives its encoder (``FamilyAdapter.encoder``). Everything
the editor does differently per task goes through these methods, so a new task is one class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .types import EditError, EditRequest

__all__ = ["ENCODERS", "Encoded", "ModelHandle", "TaskEncoder", "encoder_for", "subject_last_token"]


class ModelHandle(Protocol):
    """What an encoder needs of the editor's shared handle (:class:`fastpatch.editor.handle.ModelHandle`)."""

    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device: ...

    def check_len(self, n: int) -> None: ...

    def to_dev(self, enc: Any) -> dict[str, torch.Tensor]: ...


@dataclass
class Encoded:
    """One request as model inputs plus the positions the loss reads."""

    inputs: dict[str, torch.Tensor]  # batch of 1, no padding
    label_pos: torch.Tensor  # positions in the FFN's sequence (decoder for seq2seq)
    labels: torch.Tensor  # target token ids or class label, one per label position
    ffn_len: int  # length of the FFN's sequence
    prompt: str | None = None  # the prompt it was encoded from (decoder-only models)


class TaskEncoder:
    """The generative base: targets are token sequences scored at their label positions."""

    task = ""
    #: the model generates text (greedy decoding)
    generative = True
    #: labels are vocabulary tokens (a value init along the output embedding, candidate tokens)
    has_vocab = True
    #: decoder-only: requests are trained behind generated context prefixes
    #: (``EditorConfig.augment``) and captured in one right-padded forward on the fast path
    augments = False
    #: the forward takes ``use_cache`` (switched off when scoring)
    cached_forward = True
    #: padding side for greedy generation
    generation_padding = "right"

    def encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        """Tokenize a request; raise ``EditError`` on bad input before anything is touched."""
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise EditError("empty prompt")
        if req.target is None or not req.target.strip():
            raise EditError("empty target")
        return self._encode(h, req)

    def _encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        raise NotImplementedError

    def request(self, prompt: str, target: Any) -> EditRequest:
        """The request that scores ``target`` after ``prompt`` (a class index for classifiers)."""
        return EditRequest(prompt, target=target)

    def forward(self, h: ModelHandle, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's forward for scoring (no key/value cache)."""
        return h.model(**inputs, use_cache=False) if self.cached_forward else h.model(**inputs)

    def rows(self, logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
        """One sequence's logits at the rows its labels are read from."""
        return logits[enc.label_pos.to(logits.device)]

    def label_smoothing(self, value: float) -> float:
        """The edit loss's label smoothing for this task."""
        return value

    def memory_batch(self, h: ModelHandle, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Complete a right-padded batch of memory texts (in place); return the mask of the FFN
        positions that count."""
        return mask

    def generated(self, gen: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The new tokens of ``generate``'s output (the decoder's, after its start token)."""
        return gen[:, 1:]


class CausalEncoder(TaskEncoder):
    """Decoder-only LMs: the target continues the prompt, teacher-forced."""

    task = "causal"
    augments = True
    generation_padding = "left"

    def generated(self, gen: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return gen[:, inputs["input_ids"].shape[1]:]

    @staticmethod
    def target_text(prompt: str, target: str) -> str:
        """The target as it follows the prompt (a space between words that would run together)."""
        if not prompt.endswith((" ", "\n")) and not target.startswith((" ", "\n")):
            return " " + target
        return target

    def _encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        tok = h.tokenizer
        p_ids = tok(req.prompt)["input_ids"]
        t_ids = tok(self.target_text(req.prompt, req.target), add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise EditError(f"target {req.target!r} tokenizes to no tokens")
        ids = p_ids + t_ids[:-1]
        h.check_len(len(ids) + 1)
        pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))
        return Encoded({"input_ids": torch.tensor([ids], device=h.device)}, pos, torch.tensor(t_ids), len(ids),
                       prompt=req.prompt)


class Seq2SeqEncoder(TaskEncoder):
    """Encoder-decoder LMs: the target is the decoder's output."""

    task = "seq2seq"

    def _encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        tok = h.tokenizer
        enc = tok(req.prompt, return_tensors="pt")
        labels = tok(text_target=req.target)["input_ids"]
        content = [t for t in labels if t not in tok.all_special_ids]
        if not content:
            raise EditError(f"target {req.target!r} tokenizes to no tokens")
        start = h.model.config.decoder_start_token_id
        dec = [start] + labels[:-1]
        h.check_len(max(enc["input_ids"].shape[1], len(dec)))
        inputs = h.to_dev(enc)
        inputs["decoder_input_ids"] = torch.tensor([dec], device=h.device)
        return Encoded(inputs, torch.arange(len(labels)), torch.tensor(labels), len(dec))

    def memory_batch(self, h: ModelHandle, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        start = h.model.config.decoder_start_token_id
        ids = inputs["input_ids"]
        inputs["decoder_input_ids"] = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], 1)
        inputs["decoder_attention_mask"] = mask.long()
        return mask


class MaskedLMEncoder(TaskEncoder):
    """Masked LMs: the target fills the prompt's mask token(s)."""

    task = "mlm"
    generative = False
    cached_forward = False

    def _encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        tok = h.tokenizer
        mask = tok.mask_token
        if mask is None or mask not in req.prompt:
            raise EditError(f"masked-LM prompt must contain the mask token {mask!r}")
        t_ids = tok(req.target.strip(), add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise EditError(f"target {req.target!r} tokenizes to no tokens")
        prompt = req.prompt
        if prompt.count(mask) == 1 and len(t_ids) > 1:
            prompt = prompt.replace(mask, " ".join([mask] * len(t_ids)))
        enc = tok(prompt, return_tensors="pt")
        pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero().squeeze(1)
        if pos.numel() != len(t_ids):
            raise EditError(f"prompt has {pos.numel()} mask tokens but the target has {len(t_ids)} tokens")
        h.check_len(enc["input_ids"].shape[1])
        return Encoded(h.to_dev(enc), pos, torch.tensor(t_ids), enc["input_ids"].shape[1])


class ClassifierEncoder(TaskEncoder):
    """Sequence classifiers: the label is read at [CLS] (the pooled output)."""

    task = "cls"
    generative = False
    has_vocab = False
    cached_forward = False

    def encode(self, h: ModelHandle, req: EditRequest) -> Encoded:
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise EditError("empty prompt")
        n_labels = int(getattr(h.model.config, "num_labels", 2))
        if req.label is None or isinstance(req.label, bool) or not 0 <= int(req.label) < n_labels:
            raise EditError(f"label {req.label!r} out of range: this classifier has {n_labels} labels")
        enc = h.tokenizer(req.prompt, return_tensors="pt")
        h.check_len(enc["input_ids"].shape[1])
        return Encoded(h.to_dev(enc), torch.tensor([0]), torch.tensor([int(req.label)]), enc["input_ids"].shape[1])

    def request(self, prompt: str, target: Any) -> EditRequest:
        return EditRequest(prompt, label=int(target))

    def rows(self, logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
        return logits.reshape(1, -1)

    def label_smoothing(self, value: float) -> float:
        return 0.0

    def memory_batch(self, h: ModelHandle, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        cls_only = torch.zeros_like(mask)
        cls_only[:, 0] = True
        return cls_only


ENCODERS: dict[str, TaskEncoder] = {e.task: e for e in (CausalEncoder(), Seq2SeqEncoder(), MaskedLMEncoder(),
                                                        ClassifierEncoder())}


def encoder_for(task: str) -> TaskEncoder:
    """The encoder of a task.

    Raises:
        EditError: an unsupported task.
    """
    try:
        return ENCODERS[task]
    except KeyError:
        raise EditError(f"unsupported task {task!r}") from None


def subject_last_token(tokenizer: Any, prompt: str, subject: str) -> int | None:
    """The position, in ``tokenizer(prompt)``'s ids, of the token that ends the last mention of
    ``subject`` in ``prompt`` (None when it is not there). Reads the fast tokenizers' character
    offsets; a slow tokenizer counts the tokens of the prompt up to the subject's end."""
    subject = subject.strip() if subject else ""
    start = prompt.rfind(subject) if subject else -1
    if start < 0:
        return None
    end = start + len(subject)
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        return len(tokenizer(prompt[:end])["input_ids"]) - 1
    inside = [k for k, (a, b) in enumerate(offsets) if b > a and a < end]
    return inside[-1] if inside else None
