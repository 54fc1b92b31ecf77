"""The scores beside the headline metrics: CounterFact's probability comparisons, free-generation
reliability and generality, and the model's general ability (perplexity on held-out text and
accuracy on questions it answered right before the stream).

* **CounterFact scores** (ROME/MEMIT/AlphaEdit): efficacy ``ES`` (the edit prompt prefers
  ``target_new`` to ``target_true``), paraphrase ``PS`` (its paraphrases do) and neighbourhood
  ``NS`` (prompts about other subjects with the same relation and true object still prefer
  ``target_true``), each with its magnitude (``EM``, ``PM``, ``NM``: mean difference of the two
  geometric-mean token probabilities). Computed for streams whose locality prompts are such
  neighbourhood prompts (their answer is the edit's true object), e.g. CounterFact in the ROME or
  the EasyEdit format; the unedited model's values are in the baseline.
* **Token accuracy** (``Rel_tok``, ``Gen_tok``; computed by the evaluation itself): EasyEdit's own
  Rel./Gen., the fraction of a target's tokens that are the teacher-forced argmax, averaged; the
  headline ``Rel``/``Gen`` are stricter (every token right).
* **Free generation** (``Rel_gen``, ``Gen_gen``): greedy decoding from the prompt, right when the
  generated answer starts with the target at a word boundary ("The Mirage of Model Editing"'s
  stricter protocol); at the end of a run only.
* **General ability** (``PPL``, ``Ability``): perplexity on held-out text and accuracy on a set
  of questions the unedited model answered right (not the stream's locality prompts), at every
  evaluation point, beside their pre-edit values ``PPL_0`` (``Ability`` is 1 before editing by
  construction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..metrics import exact_match_rate, generalization_rate, preference_score

if TYPE_CHECKING:  # pragma: no cover
    from ..data.records import EditRecord
    from .session import RunSession

__all__ = ["SCORE_NAMES", "ability_baseline", "ability_scores", "counterfact_baseline", "counterfact_scores",
           "generation_scores", "is_counterfact", "neighbourhood"]

log = logging.getLogger("fastpatch.run")

#: Every score this module adds to an evaluation point, in table order.
SCORE_NAMES: tuple[str, ...] = ("ES", "PS", "NS", "EM", "PM", "NM", "Rel_tok", "Gen_tok", "Rel_gen", "Gen_gen", "PPL",
                                "Ability")


def neighbourhood(r: EditRecord) -> list[str]:
    """The record's locality prompts whose answer is its true object (CounterFact's neighbourhood
    prompts); none when the record has no ``ground_truth`` or it equals the new target."""
    gt = r.ground_truth
    if not gt or gt.strip() == r.target.strip():
        return []
    return [p for p, a in r.locality if a.strip() == gt.strip()]


def is_counterfact(records: Sequence[EditRecord]) -> bool:
    """Whether the CounterFact scores apply: generative records with a true object that differs
    from the new target, and neighbourhood prompts among their locality prompts."""
    usable = [r for r in records if r.label is None and r.ground_truth and r.ground_truth.strip() != r.target.strip()]
    return bool(usable) and len(usable) == len(records) and any(neighbourhood(r) for r in usable)


#: ``call(run, fn, pairs)``: ``fn(prompts, targets, batch_size=...)`` over pairs in batches sorted by
#: length, results in input order (the evaluation's batching, ``fastpatch.run.evaluation._sorted_call``).
SortedCall = Callable[["RunSession", Callable[..., list[Any]], Sequence[tuple[str, str]]], list[Any]]


def counterfact_scores(run: RunSession, records: Sequence[EditRecord], call: SortedCall) -> dict[str, float | None]:
    """ES/EM, PS/PM and NS/NM of the current model over ``records`` (one batched pass per answer)."""
    prompts = [(r.prompt, r) for r in records]
    paras = [(p, r) for r in records for p in r.rephrases]
    neigh = [(p, r) for r in records for p in neighbourhood(r)]
    items = prompts + paras + neigh
    new = call(run, run.ed.target_logprobs, [(p, r.target) for p, r in items])
    true = call(run, run.ed.target_logprobs, [(p, r.ground_truth or "") for p, r in items])
    a, b = len(prompts), len(prompts) + len(paras)
    es, em = preference_score(new[:a], true[:a])
    # PS as ROME averages it: over every paraphrase prompt
    ps, pm = preference_score(new[a:b], true[a:b])
    ns, nm = preference_score(true[b:], new[b:])
    return {"ES": es, "PS": ps, "NS": ns, "EM": em, "PM": pm, "NM": nm}


def counterfact_baseline(run: RunSession, call: SortedCall) -> dict[str, Any] | None:
    """The unedited model's CounterFact scores over the whole (limited) stream; None when they do
    not apply (:func:`is_counterfact`)."""
    recs = list(run.records[: run.n_total])
    if run.labels is not None or not is_counterfact(recs):
        return None
    out = counterfact_scores(run, recs, call)
    log.info("baseline CounterFact scores: %s", " ".join(f"{k}={v:.3f}" for k, v in out.items() if v is not None))
    return out


def generation_scores(run: RunSession, records: Sequence[EditRecord]) -> dict[str, float | None]:
    """Rel_gen and Gen_gen: free greedy generation from each prompt and paraphrase."""
    if run.labels is not None or not records or not hasattr(run.ed, "generates"):
        return {}
    items = [(r.prompt, r.target) for r in records] + [(p, r.target) for r in records for p in r.rephrases]
    ok = run.ed.generates([p for p, _ in items], [t for _, t in items], batch_size=run.options.batch_size)
    n = len(records)
    per_request, k = [], n
    for r in records:
        per_request.append(ok[k : k + len(r.rephrases)])
        k += len(r.rephrases)
    return {"Rel_gen": exact_match_rate(ok[:n]), "Gen_gen": generalization_rate(per_request)}


#: ``check(run, pairs) -> [right?]``: how the evaluation scores (question, answer) pairs.
CheckPairs = Callable[["RunSession", Sequence[tuple[str, str]]], list[bool]]


def ability_baseline(run: RunSession, check_pairs: CheckPairs) -> dict[str, Any] | None:
    """The unedited model's general ability: ``PPL_0`` on the held-out texts and the questions of
    ``options.scores.ability_pairs`` it answers right (the set ``Ability`` is measured on); None without
    either set."""
    opts = run.options
    if run.labels is not None or not (opts.scores.ability_texts or opts.scores.ability_pairs):
        return None
    pairs = [(p, t) for p, t in dict.fromkeys((p, t) for p, t in (opts.scores.ability_pairs or []))]
    ok = check_pairs(run, pairs) if pairs else []
    right = [[p, t] for (p, t), c in zip(pairs, ok) if c]
    ppl = run.ed.perplexity(list(opts.scores.ability_texts or []), batch_size=opts.batch_size) if opts.scores.ability_texts else None
    log.info("general ability before editing: perplexity %s on %d texts; %d of %d questions right",
             f"{ppl:.3f}" if ppl is not None else "n/a", len(opts.scores.ability_texts or []), len(right), len(pairs))
    return {"PPL_0": ppl, "questions": right, "candidates": len(pairs), "texts": len(opts.scores.ability_texts or [])}


def ability_scores(run: RunSession, check_pairs: CheckPairs) -> dict[str, float | None]:
    """PPL and Ability of the current model (empty when the run has no ability baseline)."""
    base = run.baseline.get("ability")
    if not base:
        return {}
    out: dict[str, float | None] = {}
    if base.get("PPL_0") is not None:
        out["PPL"] = run.ed.perplexity(list(run.options.scores.ability_texts or []), batch_size=run.options.batch_size)
    questions = [(p, t) for p, t in base.get("questions", [])]
    out["Ability"] = exact_match_rate(check_pairs(run, questions)) if questions else None
    return out
