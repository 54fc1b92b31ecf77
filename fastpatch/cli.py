"""The ``fastpatch`` command line.

    fastpatch run --model smollm2 --data geography --out runs/demo
    fastpatch run --model minilm --out runs/claims      # --data claims: the classification setting
    fastpatch run --model DIR --data zsre.json --out runs/zsre --protocol easyedit --limit 1000
    fastpatch run ... --resume                 # after a crash or kill: continue, nothing redone
    fastpatch report runs/demo                 # re-render plots, print the summary table

``--model``: ``smollm2`` (SmolLM2-135M-Instruct, converted once and cached), ``minilm`` (a
true/false claim classifier on all-MiniLM-L6-v2, trained once on the train-country claims and
cached: :mod:`fastpatch.app.classifier`) or a local Hugging Face directory (a causal LM, or a
``...ForSequenceClassification`` checkpoint). ``--data``: ``geography`` (the built-in
country-capital stream, with its disjoint memory corpus and currency-fact locality set),
``claims`` (the built-in true/false claims of the held-out countries, for classifiers; the
default with ``--model minilm``; :mod:`fastpatch.app.claims`) or a file (.json/.jsonl/.parquet)
in one of the formats of :mod:`fastpatch.data.formats`. ``minilm`` with ``geography`` (or
``smollm2`` with ``claims``) is refused with a message: one is a classifier, the other a
generative stream.

On ``--resume`` the editor configuration comes from the checkpoint: a ``--set`` that contradicts
it is refused (exit status 2), as are another model, data or protocol and a damaged checkpoint.

Exit status: 0 done; 1 unexpected error; 2 bad arguments, bad data or a refused resume;
130 interrupted (Ctrl-C; ``--resume`` continues from the last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .app.registry import Stream
    from .run import StartPlan

__all__ = ["main", "build_parser"]

log = logging.getLogger("fastpatch.cli")

#: --memory-limit when not given: one memory text per request to edit, at least
#: ``MIN_MEMORY_TEXTS`` and at most ``MAX_MEMORY_TEXTS`` (all of them for a stream whose vectors are
#: cheap, e.g. claims). More patches fire in more places, so a longer stream needs a larger memory
#: to keep them silent; 1,000 texts give ~19,500 vectors, half the editor's default memory cap.
MIN_MEMORY_TEXTS = 400
MAX_MEMORY_TEXTS = 1000


def default_memory_limit(n_requests: int) -> int:
    """The ``--memory-limit`` of a stream of ``n_requests`` requests to edit (see
    ``MIN_MEMORY_TEXTS``)."""
    return max(MIN_MEMORY_TEXTS, min(int(n_requests), MAX_MEMORY_TEXTS))
#: --memory files read as streams (their requests' texts), not as one text per line.
STREAM_SUFFIXES = (".json", ".jsonl", ".parquet")


#: Locality pairs per TrainR/TestR set when ``--retain-size`` is not given.
DEFAULT_RETAIN_SIZE = 200

def build_parser() -> argparse.ArgumentParser:
    """The ``fastpatch`` argument parser: the ``run`` and ``report`` commands and their options."""
    p = argparse.ArgumentParser(prog="fastpatch", description="Fast sequential model editing (Transformer-Patcher).")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an edit stream against a model",
                       description="Run an edit stream against a model; write edits.jsonl, summary.json/.csv, "
                                   "plots and checkpoints to --out.")
    r.add_argument("--model", required=True,
                   help="'smollm2', 'minilm' (true/false claim classifier) or a local Hugging Face model directory")
    r.add_argument("--data", default=None,
                   help="'geography' (built-in capitals, generative), 'claims' (built-in true/false claims, for "
                        "classifiers; the default with --model minilm) or an edit-stream file (.json/.jsonl/.parquet)")
    r.add_argument("--out", required=True, help="output directory of the run")
    r.add_argument("--limit", type=int, default=None, help="process only the first N requests")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an unfinished run in --out")
    r.add_argument("--protocol", choices=("tpatcher", "easyedit"), default="tpatcher",
                   help="tpatcher (default): edit only what the current model gets wrong; easyedit: edit every request")
    r.add_argument("--format", default="auto", choices=("auto", "zsre", "counterfact", "easyedit", "fastpatch"),
                   help="edit-stream file format (default: auto-detected)")
    r.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted in the summary) instead of failing")
    r.add_argument("--eval-every", type=int, default=50, metavar="K",
                   help="evaluate ER/TrainR/TestR/Rel/Loc every K edits (0: only at the end; default 50)")
    r.add_argument("--eval-sample", type=int, default=0, metavar="N",
                   help="score the intermediate evaluation points on a fixed random sample of N of the requests "
                        "so far (0: all; default); the final point scores every request")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="checkpoint every K edits (default: --eval-every, or 50 when that is 0)")
    r.add_argument("--memory", default="auto",
                   help="T-Patcher memory corpus: auto (geography, claims: their memory sets; files: the built-in "
                        "FanOutQA + continent prompts when installed; default), none, a text file (one per line), "
                        "or a stream file (.json/.jsonl/.parquet: its requests' prompts, paraphrases and locality "
                        "prompts, e.g. a held-out split of the benchmark; its prompts and paraphrases also teach "
                        "the phrasing views of --set phrasings=N)")
    r.add_argument("--memory-limit", type=int, default=None, metavar="N",
                   help="use at most N memory texts (a fixed random sample; 0: all). The memory forward "
                        "pass costs ~0.05-0.1 s per text for SmolLM2 on 2 CPU cores; default: one per request "
                        "to edit (--limit), at least 400 and at most 1000, "
                        "all for --data claims)")
    r.add_argument("--retain-size", type=int, default=None, metavar="N",
                   help=f"most locality pairs in each of the TrainR/TestR sets (default {DEFAULT_RETAIN_SIZE}; on "
                        "--resume, the run's own: its sets are reused)")
    r.add_argument("--no-general-ability", dest="general_ability", action="store_false",
                   help="skip the general-ability scores of a file stream (perplexity on held-out text, "
                        "accuracy on questions the unedited model answers right)")
    r.add_argument("--no-generation-metrics", dest="generation_metrics", action="store_false",
                   help="skip the free-generation Rel/Gen at the end of the run")
    r.add_argument("--batch-size", type=int, default=32, metavar="N", help="evaluation batch size (default 32)")
    r.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:1, ...")
    r.add_argument("--module-path", default=None, metavar="PATH",
                   help="the FFN to patch, e.g. model.layers.27.mlp (default: a built-in model's preset, else "
                        "the family's last FFN; given, it replaces the preset's layer and settings). An earlier "
                        "layer of a Llama-like model trains through the layers after it (the deep tail), of "
                        "other families through a full forward per step")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="EditorConfig override, e.g. --set max_steps=100 (repeatable)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    r.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    rp = sub.add_parser("report", help="re-render the plots and print the summary of a run directory")
    rp.add_argument("dir", help="run directory (the --out of fastpatch run)")
    rp.add_argument("--no-plots", action="store_true", help="only print the table")
    rp.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    return p


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fastpatch").setLevel(level)
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # transformers' own weight-loading progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


class CLIError(Exception):
    """A user-facing error (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Pieces of `run`
# ---------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_steps=100", "keep_failed=true"]`` -> typed EditorConfig keyword arguments."""
    from .editor import EditorConfig

    types = {f.name: f for f in dataclasses.fields(EditorConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        default = getattr(EditorConfig(), key)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise CLIError(f"--set {item!r}: {raw!r} is not a valid {type(default).__name__}") from None
        out[key] = value
    from .editor import EditError

    try:
        EditorConfig(**out)  # validate now, before the (slow) model load
    except EditError as err:
        raise CLIError(f"--set: {err}") from None
    return out


def _check_model_and_data(args: argparse.Namespace) -> None:
    """Fill in the default ``--data`` and refuse built-in model/stream pairs that cannot work."""
    from .app import registry

    try:
        if args.data is None:
            args.data = registry.default_data(args.model)
        registry.check_pairing(args.model, args.data)
    except registry.RegistryError as err:
        raise CLIError(str(err)) from None


def load_data(args: argparse.Namespace) -> Stream:
    """The :class:`~fastpatch.app.registry.Stream` ``--data`` names (a built-in stream or a file)."""
    from .app import registry

    try:
        return registry.load_data(args.data, fmt=args.format, skip_bad=args.skip_bad)
    except registry.RegistryError as err:
        raise CLIError(str(err)) from None


def _check_memory_arg(choice: str) -> None:
    """``--memory`` is auto, none, or a readable text or stream file."""
    if choice in ("auto", "none"):
        return
    if not Path(choice).expanduser().is_file():
        raise CLIError(f"--memory {choice!r}: expected auto, none, a text file or a stream file")


def _record_texts(records: Sequence[Any]) -> list[str]:
    """Every text a request is scored on: its prompt, paraphrases and locality prompts."""
    return [t for r in records for t in (r.prompt, *r.rephrases, *(p for p, _ in r.locality))]


def held_out_records(args: argparse.Namespace) -> list[Any]:
    """The records of a ``--memory`` stream file (a held-out split), else none."""
    path = Path(args.memory).expanduser()
    if args.memory in ("auto", "none") or path.suffix.lower() not in STREAM_SUFFIXES or not path.is_file():
        return []
    from .data.formats import StreamFormatError, load_stream

    try:
        return list(load_stream(path).records)
    except StreamFormatError as err:
        raise CLIError(f"--memory {args.memory!r}: not a stream file this version reads: {err}") from err


def memory_corpus(args: argparse.Namespace, stream: Stream, held_out: list[Any] | None = None) -> list[str] | None:
    """The memory texts for ``--memory``: ``auto`` (the stream's own corpus, else the app's
    default), ``none``, a text file (one text per line), or a stream file (``.json``, ``.jsonl``,
    ``.parquet`` in any format :func:`fastpatch.data.formats.load_stream` reads: the prompts,
    paraphrases and locality prompts of its records, e.g. a benchmark's held-out split, as the
    T-Patcher authors take the memory from the training split; ``held_out``: that file's records,
    when the caller has read them already).

    The prompts, paraphrases and locality prompts of every request of the stream (not only the
    first ``--limit``: a run can later be extended) are always removed: the memory must be
    disjoint from what is evaluated."""
    choice = args.memory
    records = stream.edit_records
    if choice == "none":
        return None
    if choice == "auto":
        if stream.memory is not None:
            texts = stream.memory
        else:
            from .app.registry import default_memory_corpus

            texts = default_memory_corpus()
            if texts is None:
                return None
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise CLIError(f"--memory {choice!r}: expected auto, none, a text file or a stream file")
        if path.suffix.lower() in STREAM_SUFFIXES:
            texts = _record_texts(held_out if held_out is not None else held_out_records(args))
        else:
            texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    banned = set(_record_texts(records))
    texts = [t for t in dict.fromkeys(texts) if t not in banned]
    if args.memory_limit and len(texts) > args.memory_limit:
        import random

        keep = set(random.Random(0).sample(range(len(texts)), args.memory_limit))
        texts = [t for k, t in enumerate(texts) if k in keep]  # corpus order kept
    return texts


def _device(name: str) -> str:
    """The torch device ``--device`` names (``auto``: cuda when available, else cpu).

    Raises:
        CLIError: not a device name, or a CUDA device on a machine without a usable one.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name!r}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("limit", "retain_size", "batch_size", "eval_every", "eval_sample", "memory_limit"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "batch_size" else 0):
            raise CLIError(f"--{name.replace('_', '-')} must be >= {1 if name == 'batch_size' else 0}, got {v}")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        raise CLIError(f"--checkpoint-every must be > 0, got {args.checkpoint_every}")


def _load_editor(args: argparse.Namespace, plan: StartPlan, overrides: dict[str, Any], device: str) -> Any:
    """The model on ``device`` and an editor: restored from the checkpoint being resumed (a
    ``--set`` that contradicts it is refused), else a fresh one with ``overrides``."""
    from .app import registry
    from .editor import Editor, EditorConfig

    t0 = time.perf_counter()
    builtin = registry.find_model(args.model)
    if builtin is not None and builtin.note:
        log.info(builtin.note)
    model, tokenizer = registry.resolve_model(args.model)
    model.to(device)
    log.info("model %s loaded on %s in %.1fs", args.model, device, time.perf_counter() - t0)
    ckpt = plan.checkpoint
    if ckpt is None:
        # a built-in model's preset (layer, key position) unless --module-path names the FFN
        preset = builtin.preset if builtin is not None and args.module_path is None else registry.EditorPreset()
        if preset.module_path or preset.settings:
            log.info("editor preset of %s: %s%s", builtin.name if builtin else args.model,
                     preset.module_path or "the last FFN",
                     "".join(f", {k}={v!r}" for k, v in preset.settings if k not in overrides))
        config = EditorConfig(**{**dict(preset.settings), **overrides})
        return Editor(model, tokenizer, config=config, module_path=args.module_path or preset.module_path)
    from safetensors import SafetensorError

    try:
        editor = Editor.load(ckpt / "editor", model, tokenizer)
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # an unreadable part of the checkpoint
        raise CLIError(f"cannot resume from checkpoint {ckpt}: {err}; start over with --overwrite "
                       f"(or another --out)") from err
    if args.module_path is not None and args.module_path != editor.module_path_arg:
        raise CLIError(f"cannot resume: the run patches {editor.module_path_arg or 'the last FFN'!s}, not "
                       f"--module-path {args.module_path}; drop --module-path, or start over with --overwrite")
    changed = {k: (getattr(editor.config, k), v) for k, v in overrides.items() if getattr(editor.config, k) != v}
    if changed:
        raise CLIError("cannot resume: the run was made with " + ", ".join(
            f"{k}={old!r}" for k, (old, _) in changed.items()) + ", not " + ", ".join(
            f"{k}={new!r}" for k, (_, new) in changed.items()) + "; the editor configuration comes from the "
            "checkpoint: drop or fix --set, or start over with --overwrite (or another --out)")
    return editor


def cmd_run(args: argparse.Namespace) -> int:
    """``fastpatch run``: check every argument, load the data, decide start or resume (before the
    slow model load), load the model and editor, run the stream, print the summary."""
    from .app.registry import default_ability_sets, model_identity
    from .run import (OutputOptions, RetainOptions, RunIdentity, RunOptions, ScoreOptions, data_fingerprint,
                      plan_start, run_stream)

    out = Path(args.out)
    overrides = parse_overrides(args.overrides)
    _check_numbers(args)
    _check_model_and_data(args)
    device = _device(args.device)  # a bad --device fails now, not after the (slow) model load
    _check_memory_arg(args.memory)  # and so does a --memory file that is not there
    stream = load_data(args)
    if args.memory_limit is None:
        n_requests = min(args.limit or len(stream.edit_records), len(stream.edit_records))
        args.memory_limit = 0 if stream.all_memory else default_memory_limit(n_requests)
    model_id = model_identity(args.model)
    fingerprints = {"model": model_id, "data": data_fingerprint(stream.edit_records), "protocol": args.protocol}
    # The runner's one start/resume/overwrite policy, applied now to refuse before the model load.
    plan = plan_start(out, resume=args.resume, overwrite=args.overwrite, fingerprints=fingerprints)
    if args.retain_size is None:  # a resumed run keeps the retain sets it drew (run_stream checks)
        resumed = plan.existing is not None and "retain_size" in plan.existing
        args.retain_size = plan.existing["retain_size"] if resumed else DEFAULT_RETAIN_SIZE
    editor = _load_editor(args, plan, overrides, device)
    held_out = held_out_records(args) if plan.checkpoint is None else []  # read once: memory and phrasings
    if held_out:  # a held-out split also teaches the phrasing views (a checkpoint has them)
        editor.add_phrasings(held_out)
    ability = default_ability_sets(stream) if args.general_ability else None
    options = RunOptions(
        protocol=args.protocol, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        eval_sample=args.eval_sample,
        limit=args.limit, resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size,
        memory_texts=memory_corpus(args, stream, held_out) if plan.checkpoint is None else None,
        retain=RetainOptions(pairs=stream.retain_pairs, sets=stream.retain_sets, size=args.retain_size),
        scores=ScoreOptions(ability_texts=ability[0] if ability else None,
                            ability_pairs=ability[1] if ability else None, generation=args.generation_metrics),
        output=OutputOptions(progress=not args.no_progress and not args.quiet, plots=not args.no_plots,
                             run_info={"cli": {k: v for k, v in vars(args).items() if k != "func"},
                                       "device": device}),
        identity=RunIdentity(model=model_id, data=stream.data_id),
    )
    summary = run_stream(editor, stream.records, out, options)
    from .report import format_table

    print(format_table(summary))
    print(f"\nrun directory: {out}  (edits.jsonl, summary.json/.csv"
          f"{', metrics.png, heatmap.png, latency.png' if not args.no_plots else ''})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``fastpatch report``: print a run directory's summary (table or JSON) and re-render its plots."""
    from .report import load_run, report

    if args.json:
        print(json.dumps(load_run(args.dir)["summary"], indent=1))
        return 0
    report(args.dir, plots=not args.no_plots)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastpatch`` command; returns the exit status (module docstring)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    from .run import RunError

    try:
        from .data.formats import StreamFormatError
    except ImportError:  # pragma: no cover
        StreamFormatError = ValueError  # type: ignore[misc,assignment]
    try:
        from .app.models import ModelNotInstalledError
    except ImportError:  # pragma: no cover
        ModelNotInstalledError = ImportError  # type: ignore[misc,assignment]
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_report(args)
    except KeyboardInterrupt:
        print("\nfastpatch: interrupted; `fastpatch run ... --resume` continues from the last checkpoint",
              file=sys.stderr)
        return 130
    except (CLIError, RunError, StreamFormatError, ModelNotInstalledError, FileNotFoundError) as err:
        print(f"fastpatch: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001
        from .editor import EditError

        # Bad input surfacing as ValueError/EditError (e.g. an unknown model name): a message, not a
        # traceback -- unless -vv asks for it.
        if isinstance(err, (EditError, ValueError, NotImplementedError)) and getattr(args, "verbose", 0) < 2:
            print(f"fastpatch: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
