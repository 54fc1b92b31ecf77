"""The loop: stream -> edits -> metrics, with evaluation points and checkpoints (:func:`run_stream`)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import restore, write_checkpoint
from .evaluation import check_pairs, check_stream, compute_baseline, evaluate
from .identity import data_fingerprint, model_fingerprint
from .errors import RunError
from .rundir import checkpoint_position, clear_run, latest_checkpoint, plan_start, read_json
from .options import RunOptions
from .session import RunSession, fmt
from .summary import build_summary, save_activations

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = ["run_stream"]

log = logging.getLogger("fastpatch.run")


def run_stream(
    editor: Any,
    stream: Sequence[EditRecord] | Any,
    out_dir: str | os.PathLike[str],
    options: RunOptions | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Run an edit stream through ``editor`` and write the run's outputs to ``out_dir``.

    Args:
        editor: a :class:`fastpatch.editor.Editor`. On ``resume`` it must already hold the latest
            checkpoint (``Editor.load(latest_checkpoint(out_dir) / "editor", model, tokenizer)``);
            this is verified (patch count and edit ids).
        stream: the requests, a sequence of :class:`~fastpatch.data.formats.EditRecord` (or a
            ``StreamLoad``, whose ``.skipped`` rows are reported in the summary).
        out_dir: the run directory (created).
        options: how to run it (:class:`RunOptions`).
        **fields: :class:`RunOptions` fields, given one by one (``eval_every=10``, or a group
            field by its flat name: ``retain_size=50``, ``plots=False``) instead of, or on top of,
            ``options`` (:meth:`RunOptions.replace`).

    Returns:
        The summary (also written to summary.json / summary.csv).

    Raises:
        RunMismatchError: resume with another model, data or protocol.
        RunExistsError: ``out_dir`` holds an unfinished run and neither ``resume`` nor ``overwrite``
            is set (a finished one is replaced: :func:`fastpatch.run.rundir.plan_start`).
        RunError: inconsistent or damaged checkpoint (e.g. the editor does not hold it, a corrupt
            state.json, a ``limit`` below its position), or a request text the editor cannot score
            (the message names the request).
    """
    opts = (options or RunOptions()).replace(**fields)
    records = list(getattr(stream, "records", stream))
    skipped_rows = [list(s) for s in getattr(stream, "skipped", [])]
    run = RunSession(editor, records, Path(out_dir), opts)
    fingerprints = _fingerprints(editor, records, opts)
    check_stream(run)  # before anything is written

    plan = plan_start(run.paths.root, resume=opts.resume, overwrite=opts.overwrite, fingerprints=fingerprints)
    if plan.replace:
        clear_run(run.paths)
    run.paths.root.mkdir(parents=True, exist_ok=True)
    existing, ckpt = plan.existing, plan.checkpoint
    info = _run_info(opts, fingerprints, existing, skipped_rows, len(records))
    if ckpt is None and editor.num_patches:
        log.warning("the editor already holds %d patches: the 'pre-edit' baseline is of the patched model",
                    editor.num_patches)
    if ckpt is not None:
        restore(run, ckpt)
    else:
        if existing is not None:
            log.info("no checkpoint in %s yet: starting the stream from the beginning", run.paths.root)
        for p in run.paths.outputs():
            p.unlink(missing_ok=True)
    run.baseline = _baseline(run, existing, ckpt is not None)
    from ..atomic import write_json_atomic

    write_json_atomic(run.paths.run_json, info)
    if ckpt is None and opts.memory_texts:
        _build_memory(run, list(opts.memory_texts))
    complete = _edit_all(run, info, fresh=ckpt is None)
    return _finish(run, info, complete)


def _fingerprints(editor: Any, records: Sequence[EditRecord], opts: RunOptions) -> dict[str, Any]:
    model_id = opts.identity.model
    if isinstance(model_id, str):
        model_id = model_fingerprint(model_id)
    model_fp = model_id or model_fingerprint(model=getattr(editor, "model", None))
    fingerprints = {"model": model_fp, "data": data_fingerprint(records), "protocol": opts.protocol}
    try:  # the patched layer's base weights: catches a different model under the same name
        fingerprints["weights"] = str(editor.bank_fingerprint())
    except Exception:  # noqa: BLE001
        pass
    return fingerprints


def _run_info(opts: RunOptions, fingerprints: dict[str, Any], existing: dict[str, Any] | None,
              skipped_rows: list[Any], n_stream: int) -> dict[str, Any]:
    """run.json: what was run (fingerprints, options), when it was created, how many sessions."""
    return {
        "fingerprints": fingerprints,
        "data": opts.identity.data or {},
        "protocol": opts.protocol,
        "eval_every": opts.eval_every,
        "eval_sample": opts.eval_sample,
        "checkpoint_every": opts.checkpoint_interval,
        "limit": opts.limit,
        "n_stream": n_stream,
        "retain_size": opts.retain.size,
        "batch_size": opts.batch_size,
        "skipped_rows": skipped_rows,
        "created": (existing or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sessions": (existing or {}).get("sessions", 0) + 1,
        **(opts.output.run_info or {}),
    }


def _baseline(run: RunSession, existing: dict[str, Any] | None, resumed: bool) -> dict[str, Any]:
    """The pre-edit baseline: reused on resume (it must be of the unedited model), else computed."""
    from ..atomic import write_json_atomic

    opts, paths = run.options, run.paths
    base = read_json(paths.baseline) if (existing is not None and paths.baseline.is_file()) else None
    if base is not None and "retain_size" in existing and existing["retain_size"] != opts.retain.size:
        raise RunError(
            f"cannot resume: the run's TrainR/TestR sets were drawn with retain_size={existing['retain_size']}, "
            f"not {opts.retain.size}; resume with the same value (the CLI's default on --resume), or start over "
            f"with --overwrite (or another --out)")
    if base is not None and base.get("n_records", -1) < run.n_total:
        unedited = _unedited(run.ed)
        if resumed and unedited is not None:
            # T-Patcher never changes a base weight: with the patches switched off the model is
            # the unedited one, so the baseline of a longer stream can be computed now
            log.info("extending the pre-edit baseline from %d to %d requests with the patches disabled",
                     base["n_records"], run.n_total)
            with unedited():
                base = compute_baseline(run, _retain_pairs(run), opts.retain.size, opts.retain.sets)
            write_json_atomic(paths.baseline, base, indent=None)
            return base
        if resumed:
            raise RunError(
                f"the run's pre-edit baseline covers {base['n_records']} requests, fewer than the "
                f"{run.n_total} asked for now (a larger --limit); the unedited model is needed to "
                f"extend it: start a new run (--overwrite or another --out) instead"
            )
        base = None
    if base is None:
        base = compute_baseline(run, _retain_pairs(run), opts.retain.size, opts.retain.sets)
        write_json_atomic(paths.baseline, base, indent=None)
    return base


def _retain_pairs(run: RunSession) -> Sequence[tuple[str, str]]:
    """The pairs the TrainR/TestR sets are drawn from: the options', else every locality pair."""
    pairs = run.options.retain.pairs
    return pairs if pairs is not None else [p for r in run.records for p in r.locality]


def _unedited(editor: Any) -> Callable[[], Any] | None:
    """A context manager factory that runs the editor's model unedited (its patches disabled), or
    None when the editor cannot (then a longer stream needs a new run)."""
    ffn = getattr(editor, "ffn", None)
    return getattr(ffn, "patches_disabled", None)


def _build_memory(run: RunSession, texts: list[str]) -> None:
    t0 = time.perf_counter()
    n_vec = run.ed.build_memory(texts)
    run.memory = {"texts": len(texts), "vectors": int(n_vec), "seconds": round(time.perf_counter() - t0, 3)}
    log.info("memory: %d texts -> %s FFN-input vectors (%.1fs)", len(texts), n_vec, run.memory["seconds"])


def _edit_all(run: RunSession, info: dict[str, Any], fresh: bool) -> bool:
    """The stream from the current position to the end, a final evaluation and checkpoint;
    returns whether the whole (limited) stream is done."""
    paths = run.paths
    run.edits_fh = open(paths.edits, "a", encoding="utf-8")
    run.evals_fh = open(paths.evals, "a", encoding="utf-8")
    try:
        st = run.state
        if fresh and st.n_edits == 0 and not st.evals:
            need = max(1, run.options.retain.min_right)
            zero = st.record_eval({
                "TrainR": 1.0 if len(run.baseline["train"]) >= need else None,
                "TestR": 1.0 if sum(bool(c) for *_, c in run.baseline["test"]) >= need else None,
            })
            run.write_line(run.evals_fh, {**zero, "SR": None, "GR": None, "patches": run.num_patches()})
        _loop(run, info)
        # the final point also scores free generation and writes per_request.jsonl; a run whose
        # last point is at the end but not final (an older run, resumed) gets one now
        if not st.evals or st.evals[-1].get("position") != st.position or not st.evals[-1].get("final"):
            evaluate(run, final=True)
        if (run.last_ckpt_edits != st.n_edits or latest_checkpoint(paths.root) is None
                or checkpoint_position(paths.root) != st.position):
            write_checkpoint(run, info)
        return st.position >= run.n_total
    finally:
        run.edits_fh.close()
        run.evals_fh.close()


def _finish(run: RunSession, info: dict[str, Any], complete: bool) -> dict[str, Any]:
    from .. import report  # matplotlib is imported lazily inside

    save_activations(run, run.options.output.heatmap_max_edits)  # kept even without plots: `fastpatch report` draws it
    summary = build_summary(run, info, complete=complete)
    report.write_summary(run.paths.root, summary)
    if run.options.output.plots:
        try:
            report.render_plots(run.paths.root)
        except Exception as err:  # noqa: BLE001 - plots never fail a finished run
            log.warning("could not render plots: %s", err)
    return summary


def _loop(run: RunSession, info: dict[str, Any]) -> None:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    st, recs, opts = run.state, run.records, run.options
    bar = tqdm(total=run.n_total, initial=min(st.position, run.n_total), unit="req", dynamic_ncols=True,
               disable=not opts.output.progress, desc="editing", smoothing=0.1)
    try:
        with logging_redirect_tqdm() if opts.output.progress else contextlib.nullcontext():
            while st.position < run.n_total:
                i = st.position
                line = _process(run, i, recs[i])
                run.write_line(run.edits_fh, line)
                if opts.output.on_record is not None:
                    opts.output.on_record(line)
                bar.update(1)
                bar.set_postfix(edits=st.n_edits, SR=fmt(st.sr), GR=fmt(st.gr), patches=run.num_patches(),
                                refresh=False)
                if line["action"] == "edit":
                    if opts.eval_every and st.n_edits % opts.eval_every == 0:
                        evaluate(run, final=st.position >= run.n_total)  # the stream's end is the final point
                    if st.n_edits % opts.checkpoint_interval == 0:
                        write_checkpoint(run, info)
    finally:
        bar.close()


def _process(run: RunSession, i: int, r: EditRecord) -> dict[str, Any]:
    """Edit (or skip) one request; update the metric state; return its edits.jsonl line.

    The editor checks the request first (``EditResult.already_correct``: no patch, model
    unchanged); under the T-Patcher protocol such a request is a skip, not an edit.
    """
    from ..editor import EditError, EditRequest

    ed, st = run.ed, run.state
    if run.labels is not None:  # a classifier: the label the target names (validated up front)
        req = EditRequest(prompt=r.prompt, label=run.labels[r.target], edit_id=str(r.id), rephrases=list(r.rephrases),
                          subject=r.subject)
    else:
        req = EditRequest(prompt=r.prompt, target=r.target, edit_id=str(r.id), rephrases=list(r.rephrases),
                          subject=r.subject, ground_truth=r.ground_truth)
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
    ok = check_pairs(run, [(p, r.target) for p in prompts])
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
    line.update(_result_fields(res, error))
    line.update({"edits": st.n_edits, "patches": run.num_patches(), "metrics": st.current()})
    return line


def _result_fields(res: Any, error: str | None) -> dict[str, Any]:
    """The editor's side of an edits.jsonl line (or the error that stopped the edit)."""
    if res is None:
        return {"editor_success": False, "steps": 0, "patch_ids": [], "n_neurons": 0, "error": error}
    d = res.to_dict()
    return {
        "editor_success": d.get("success"), "steps": d.get("steps"), "editor_seconds": d.get("seconds"),
        "patch_ids": d.get("patch_ids"), "n_neurons": d.get("n_neurons"),
        "already_correct": d.get("already_correct"), "kept_failed": d.get("kept_failed"),
        "losses": d.get("losses"),
    }
