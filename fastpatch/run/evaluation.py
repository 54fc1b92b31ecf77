"""Evaluation: the pre-edit baseline, the metrics at an evaluation point, and the checks every
text of the stream passes before a run starts (tokenizable; for classifiers, a class it names).

Every metric formula is in :mod:`fastpatch.metrics`; this module decides which prompts are scored
(batched, sorted by length) and feeds the results to those formulas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..metrics import (
    EVAL_METRICS,
    edit_retain_rate,
    exact_match_rate,
    generalization_rate,
    locality,
    mean,
    test_retain_rate,
    token_agreement,
    train_retain_rate,
)
from .errors import RunError
from .scores import (ability_baseline, ability_scores, counterfact_baseline, counterfact_scores, generation_scores,
                     is_counterfact)
from .session import RunSession, fmt

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = [
    "check_and_tokens",
    "check_pairs",
    "check_stream",
    "check_tokenizable",
    "classification_labels",
    "compute_baseline",
    "evaluate",
    "retain_split",
    "scored_target",
    "token_pairs",
]

log = logging.getLogger("fastpatch.run")


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
    from ..data.formats import resolve_label

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


def compute_baseline(
    run: RunSession,
    retain_pairs: Sequence[tuple[str, str]],
    retain_size: int | None,
    retain_sets: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]] | None = None,
) -> dict[str, Any]:
    """The pre-edit outputs Loc., TrainR and TestR compare against (baseline.json): the argmax
    tokens of every locality pair, and the retain sets A (pairs the unedited model gets right)
    and B (every pair of its half, with whether it was right)."""
    n = run.n_total
    t0 = time.perf_counter()
    loc_pairs: list[tuple[str, str]] = []
    index: dict[tuple[str, str], int] = {}
    for r in run.records[:n]:
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
    check_tokenizable(run, [(p, t, f"retain pair {p[:60]!r}") for p, t in a + b])
    ok, tokens = check_and_tokens(run, a + b, loc_pairs)
    loc_tokens = [[tokens[index[(p, a)]] for p, a in r.locality] for r in run.records[:n]]
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
    }
    base["counterfact"] = counterfact_baseline(run, _sorted_call)
    base["ability"] = ability_baseline(run, check_pairs)
    base["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "baseline: %d locality pairs; TrainR set %d/%d right before editing; TestR set %d (pre-edit accuracy %s) in %.1fs",
        len(loc_pairs), len(train), len(a), len(test), fmt(base["test_accuracy"]), base["seconds"],
    )
    return base


def scored_target(run: RunSession, target: str) -> Any:
    """What the editor scores a target as: the text itself, or for a classifier the class
    index it names (``"true"`` -> 1 through ``config.label2id``; validated up front)."""
    if run.labels is None:
        return target
    if target not in run.labels:  # e.g. a resumed run's baseline pairs: resolve (or refuse) now
        run.labels.update(classification_labels(run.ed, [], [("", target)]) or {})
    return run.labels[target]


def check_tokenizable(run: RunSession, items: Sequence[tuple[str, str, str]]) -> None:
    """Raise :class:`RunError` naming the first ``(prompt, target, where)`` item the editor
    cannot score (e.g. longer than the model's context, or a target of no tokens): such an
    item would stop the run in the middle of the stream, at every resume again."""
    from ..editor import EditError

    target_ids = getattr(run.ed, "target_ids", None)
    if target_ids is None or not items:
        return
    try:  # tokenization only, all at once; item by item to find the culprit
        target_ids([p for p, _, _ in items], [scored_target(run, t) for _, t, _ in items])
        return
    except EditError:
        pass
    for p, t, where in items:
        try:
            target_ids([p], [scored_target(run, t)])
        except EditError as err:
            raise RunError(f"{where}: {err}; fix or remove it (or stop the stream before it with "
                           f"--limit)") from None


def _sorted_call(run: RunSession, fn: Callable[..., list[Any]], pairs: Sequence[tuple[str, str]]) -> list[Any]:
    """``fn(prompts, targets, batch_size=...)`` over pairs sorted by length (less padding in
    each batch), results returned in the input order."""
    if not pairs:
        return []
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
    res = fn([pairs[k][0] for k in order], [scored_target(run, pairs[k][1]) for k in order], batch_size=run.options.batch_size)
    out: list[Any] = [None] * len(pairs)
    for k, r in zip(order, res):
        out[k] = r
    return out


def check_pairs(run: RunSession, pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Whether the edited model gets each ``(prompt, target)`` pair right."""
    return [bool(x) for x in _sorted_call(run, run.ed.check, pairs)]


def token_pairs(run: RunSession, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """The model's argmax tokens at each pair's target positions."""
    return [list(map(int, t)) for t in _sorted_call(run, run.ed.predict_tokens, pairs)]


def check_and_tokens(
    run: RunSession, check: Sequence[tuple[str, str]], tokens: Sequence[tuple[str, str]],
    accuracy: list[float] | None = None,
) -> tuple[list[bool], list[list[int]]]:
    """``ok`` for the ``check`` pairs and argmax tokens for the ``tokens`` pairs.

    With ``Editor.target_ids`` (the target token ids, tokenization only) this is a single
    batched forward over the union of both sets -- locality pairs are usually in both (Loc.
    reads their tokens, TrainR/TestR their correctness); without it, two passes. Given a list
    ``accuracy`` and target ids, it is filled with each ``check`` pair's token accuracy (the
    fraction of its target tokens that are the argmax: EasyEdit's per-prompt accuracy).
    """
    target_ids = getattr(run.ed, "target_ids", None)
    if target_ids is None:
        return check_pairs(run, check), token_pairs(run, tokens)
    index: dict[tuple[str, str], int] = {}
    for p in list(check) + list(tokens):
        index.setdefault((p[0], p[1]), len(index))
    union = list(index)
    toks = token_pairs(run, union)
    labels = target_ids([p for p, _ in check], [scored_target(run, t) for _, t in check]) if check else []
    labels = [list(map(int, lab)) for lab in labels]
    ok = [toks[index[(p, t)]] == lab for (p, t), lab in zip(check, labels)]
    if accuracy is not None:
        accuracy[:] = [token_agreement(lab, toks[index[pt]]) for pt, lab in zip(check, labels)]
    return ok, [toks[index[(p, t)]] for p, t in tokens]


def evaluate(run: RunSession, *, final: bool) -> dict[str, Any]:
    """ER, TrainR, TestR, Rel., Loc. (and Gen.) with the current model, batched.

    Gen. (every paraphrase of every request so far) is the costliest; it is evaluated at every
    point under the EasyEdit protocol and only at the end under the T-Patcher one, where GR
    (measured right after each edit) already tracks generalization.

    The ``final`` point (the end of the stream) also scores free generation, writes
    per_request.jsonl and is marked ``"final": true`` in evals.jsonl.
    """
    t0 = time.perf_counter()
    st = run.state
    pos = st.position
    idx = eval_indices(pos, 0 if final else run.options.eval_sample)
    recs = [run.records[i] for i in idx]
    with_gen = final or run.protocol == "easyedit"
    pairs: dict[tuple[str, str], int] = {}

    def need(p: str, t: str) -> int:
        return pairs.setdefault((p, t), len(pairs))

    own = [need(r.prompt, r.target) for r in recs]
    para = [[need(p, r.target) for p in r.rephrases] for r in recs] if with_gen else []
    train = [need(p, t) for p, t in run.baseline["train"]]
    test = [need(p, t) for p, t, _ in run.baseline["test"]]
    keys = list(pairs)
    loc_index: dict[tuple[str, str], int] = {}
    for r in recs:
        for p, a in r.locality:
            loc_index.setdefault((p, a), len(loc_index))
    loc_keys = list(loc_index)
    acc: list[float] = []
    ok, now_tokens = check_and_tokens(run, keys, loc_keys, acc)
    loc_pairs = [
        [(run.baseline["loc_tokens"][i][j], now_tokens[loc_index[(p, a)]])
         for j, (p, a) in enumerate(run.records[i].locality)]
        for i in idx
    ]
    where = {i: k for k, i in enumerate(idx)}
    values = {
        "ER": edit_retain_rate([ok[own[where[i]]] for i in st.edited if i in where]),
        "TrainR": train_retain_rate([True] * len(train), [ok[k] for k in train], run.options.retain.min_right),
        "TestR": test_retain_rate([bool(c) for *_, c in run.baseline["test"]], [ok[k] for k in test],
                                  run.options.retain.min_right),
        "Rel": exact_match_rate([ok[k] for k in own]),
        "Gen": generalization_rate([[ok[k] for k in ks] for ks in para]) if with_gen else None,
        "Loc": locality(loc_pairs),
        "n_eval_prompts": len(keys) + len(loc_keys),
    }
    if acc and run.labels is None:  # EasyEdit's own Rel./Gen.: token accuracy, not exact match
        values["Rel_tok"] = mean([acc[k] for k in own])
        if with_gen:
            values["Gen_tok"] = generalization_rate([[acc[k] for k in ks] for ks in para])
    if len(idx) < pos:
        values["sampled_requests"] = len(idx)
    if final:
        values["final"] = True
        _write_per_request(run, [ok[k] for k in own], [[ok[k] for k in ks] for ks in para], loc_pairs)
    if not with_gen:
        del values["Gen"]  # not measured here (the previous value stays current)
    if run.baseline.get("counterfact") is not None and with_gen and is_counterfact(recs):
        values.update(counterfact_scores(run, recs, _sorted_call))
    if final and run.options.scores.generation:
        values.update(generation_scores(run, recs))
    values.update(ability_scores(run, check_pairs))
    seconds = time.perf_counter() - t0
    values["eval_seconds"] = round(seconds, 3)
    st.eval_seconds += seconds
    point = st.record_eval(values)
    run.write_line(run.evals_fh, {**point, "SR": st.sr, "GR": st.gr, "patches": run.num_patches()})
    shown = {"SR": st.sr, "GR": st.gr, **{k: point.get(k) for k in EVAL_METRICS}}
    log.info("after %d edits (%d requests): %s [eval %.1fs, %d prompts%s]", st.n_edits, pos,
             " ".join(f"{k}={fmt(v)}" for k, v in shown.items() if k in point or k in ("SR", "GR")),
             seconds, values["n_eval_prompts"], f", {len(idx)} requests sampled" if len(idx) < pos else "")
    return point


def eval_indices(pos: int, sample: int) -> list[int]:
    """The requests an evaluation point scores: all ``pos`` so far, or a fixed random sample of
    ``sample`` of them (seeded by ``pos``: the same point of a rerun scores the same requests)."""
    if not sample or sample >= pos:
        return list(range(pos))
    return sorted(random.Random(pos).sample(range(pos), sample))


def _write_per_request(run: RunSession, rel: list[bool], gen: list[list[bool]],
                       loc: list[list[tuple[list[int], list[int]]]]) -> None:
    """per_request.jsonl: each request's prompt, paraphrase and locality results at the end."""
    from ..atomic import write_atomic
    from ..metrics import token_agreement

    lines = []
    for i, r in enumerate(run.records[: len(rel)]):
        lines.append(json.dumps({"i": i, "id": r.id, "rel": rel[i], "gen": gen[i] if gen else None,
                                 "loc": [round(token_agreement(a, b), 4) for a, b in loc[i]]}))
    write_atomic(run.paths.per_request, "\n".join(lines) + "\n")


def check_stream(run: RunSession) -> None:
    """Before anything is written: every target names a class (classifiers; sets ``run.labels``)
    and every text the stream's requests are scored on can be scored (:class:`RunError` naming
    the request otherwise)."""
    opts = run.options
    extra = [p for s in (opts.retain.sets or ()) for p in s] + list(opts.retain.pairs or [])
    run.labels = classification_labels(run.ed, run.records, extra)
    for r in run.records[: run.n_total]:
        where = f"request {r.id!r} (row {r.source_row})"
        check_tokenizable(
            run,
            [(r.prompt, r.target, f"{where}, prompt {r.prompt[:60]!r}")]
            + [(p, r.target, f"{where}, paraphrase {p[:60]!r}") for p in r.rephrases]
            + [(p, a, f"{where}, locality prompt {p[:60]!r}") for p, a in r.locality])
