"""The sequential-edit runner: stream -> edits -> metrics, checkpoints and reports.

    from fastpatch.run import OutputOptions, RunOptions, run_stream
    opts = RunOptions(protocol="tpatcher", eval_every=50, output=OutputOptions(plots=False))
    summary = run_stream(editor, records, "runs/x", opts)

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

Classifiers (``editor.task == "cls"``): a record's target names a class (``"true"``, through the
model's ``config.label2id``, or the index as text), its ``label`` field (when present) must agree,
and so must every locality/retain answer; all of it is checked before the run starts
(:func:`classification_labels`). Every metric is then computed on labels.

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

Modules: :mod:`.errors`, :mod:`.rundir` (the directory, reading it back, and the start/resume/overwrite policy),
:mod:`.identity` (fingerprints, the resume check), :mod:`.options` (:class:`RunOptions` and its
groups), :mod:`.session` (the shared state), :mod:`.evaluation` (baseline, metrics, up-front checks), :mod:`.checkpoint`,
:mod:`.summary` and :mod:`.loop` (:func:`run_stream`).
"""

from .evaluation import classification_labels, retain_split
from .identity import check_resume, data_fingerprint, editor_state_id, file_fingerprint, model_fingerprint
from .loop import run_stream
from .errors import RunError, RunExistsError, RunMismatchError
from .rundir import RunPaths, StartPlan, latest_checkpoint, plan_start, read_run_info
from .options import PROTOCOLS, OutputOptions, RetainOptions, RunIdentity, RunOptions, ScoreOptions
from .summary import peak_memory, versions

__all__ = [
    "PROTOCOLS",
    "RunError",
    "RunExistsError",
    "RunMismatchError",
    "OutputOptions",
    "RetainOptions",
    "RunIdentity",
    "RunOptions",
    "ScoreOptions",
    "RunPaths",
    "StartPlan",
    "check_resume",
    "classification_labels",
    "data_fingerprint",
    "editor_state_id",
    "file_fingerprint",
    "latest_checkpoint",
    "model_fingerprint",
    "peak_memory",
    "plan_start",
    "read_run_info",
    "retain_split",
    "run_stream",
    "versions",
]
