"""The stream runs' sections of the rendered results (``update_readme.py``): each published run
(``benchmarks/publish_run.py``) with its metrics, scores, method settings and curve against T, the
targets it misses, and the ablation tables (``benchmarks/ablations.py``)."""

from __future__ import annotations

import json
from typing import Any

from readme_tables import RES, ROOT
from readme_tables import fmt as _f
from readme_tables import table as _table


#: Method settings that tell the runs of the published results apart (``MethodSettings``).
_METHOD_KEYS = ("negatives", "negative_whiten", "key_boundary", "view_scatter", "memory_growth", "augment", "max_neurons",
                "phrasings", "key_position", "module_path")


def _method_line(cfg: dict[str, Any]) -> str:
    """The run's settings that the ablations vary (its ``editor_config``)."""
    shown = [f"`{k}={cfg[k]}`" for k in _METHOD_KEYS if k in cfg]
    return "Editor settings: " + ", ".join(shown) + (
        " (`negatives` absent: run before the hard negatives existed)." if "negatives" not in cfg else ".")


def _curve_lines(folder: str) -> list[str]:
    """The run's curve (``curve.json`` of ``benchmarks/publish_run.py``): metrics and seconds per
    edit at each evaluation point."""
    path = RES / folder / "curve.json"
    if not path.is_file():
        return []
    pts = json.loads(path.read_text()).get("points") or []
    if not pts:
        return []
    names = [k for k in ("Rel", "Gen", "Loc", "ES", "PS", "NS", "PPL", "Ability") if any(k in p for p in pts)]
    sampled = any(p.get("scored_requests", p["edits"]) != p["edits"] for p in pts)
    rows = [[p["edits"], p.get("patches"), *([p.get("scored_requests")] if sampled else []),
             *[p.get(k) for k in names], p.get("seconds_per_edit_median"), p.get("seconds_per_edit_p90")] for p in pts]
    return ["Against T (each evaluation point; seconds per edit of the edits since the previous point"
            + ("; `scored`: the requests scored there, a fixed random sample of the edited ones before the end"
               if sampled else "") + "):", "",
            *_table(["T", "patches", *(["scored"] if sampled else []), *names, "median s/edit", "p90 s/edit"], rows), ""]


def _memory_text(mem: dict[str, Any]) -> str:
    """``7,723 corpus vectors, 35,000 rows at the end`` (the end count when the run recorded it)."""
    text = f"{_f(mem.get('vectors'))} corpus vectors"
    return text + (f", {_f(mem['rows_now'])} rows at the end" if mem.get("rows_now") is not None else "")


def load_summary(folder: str) -> dict[str, Any] | None:
    """A published run's summary; a run scored before the runner reported EasyEdit's token
    accuracy gets it from its ``token_accuracy.json`` (``benchmarks/token_accuracy.py``)."""
    path = RES / folder / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    tok = RES / folder / "token_accuracy.json"
    sc = s.setdefault("scores", {})
    if tok.is_file() and sc.get("Rel_tok") is None:
        t = json.loads(tok.read_text())
        sc.update({k: t[k] for k in ("Rel_tok", "Gen_tok")})
    return s


def run_section(folder: str, title: str, note: str = "") -> list[str]:
    """A published run's section: counts and times, the metrics, the scores beside them (after the
    stream and unedited), its method settings, its curve against T, ``note`` and its plots."""
    path = RES / folder / "summary.json"
    s = load_summary(folder)
    if s is None:
        return []
    m = s.get("metrics") or s.get("final") or {}
    out = [f"### {title}", "", f"From [{path.relative_to(ROOT)}]({path.relative_to(ROOT)}).", ""]
    t = s.get("time") or {}
    if t:
        out += [f"{s.get('requests')} requests, {s.get('edits')} edited ({s.get('protocol')} protocol), "
                f"{s.get('patches')} patches; memory {_memory_text(s.get('memory_set') or {})}; "
                f"median {_f(t.get('edit_seconds_median'))} s per edit (p90 {_f(t.get('edit_seconds_p90'))} s); "
                f"wall time {_f(t.get('wall_seconds'))} s; peak RSS {_f((s.get('peak_memory') or {}).get('rss_mib'))} MiB.", ""]
    keys = [k for k in ("SR", "GR", "ER", "TrainR", "TestR", "Rel", "Gen", "Loc") if k in m]
    if keys:
        out += _table(keys, [[m[k] for k in keys]])
        out.append("")
    sc = s.get("scores") or {}
    pre = sc.get("pre") or {}
    names = [k for k in ("Rel_tok", "Gen_tok", "ES", "PS", "NS", "EM", "PM", "NM", "Rel_gen", "Gen_gen", "PPL", "Ability")
             if sc.get(k) is not None]
    if names:
        out += ["Beside them (`fastpatch/run/scores.py`): Rel./Gen. as EasyEdit scores them (`*_tok`, the mean "
                "token accuracy; Rel./Gen. above need every target token right), CounterFact scores, "
                "free-generation Rel./Gen., general ability.", ""]
        out += _table(["", *names], [["after the stream", *[sc[k] for k in names]],
                                     ["unedited model", *[pre.get(k, 1.0 if k == "Ability" else None) for k in names]]])
        out.append("")
    cfg = s.get("editor_config") or {}
    if cfg and "augment" not in cfg:
        out += ["Run before the context variants (`EditorConfig.augment`) and the gradient value init existed.", ""]
    elif cfg:
        out += [_method_line(cfg), ""]
    out += _curve_lines(folder)
    if note:
        out += [note, ""]
    for png in sorted((RES / folder).glob("*.png")):
        out += [f"![{png.stem}]({png.relative_to(ROOT)})", ""]
    return out


def ablation_section() -> list[str]:
    """The ablation tables of ``benchmarks/ablations.py`` (its Markdown, one heading level down)."""
    path = RES / "cpu" / "ablations.md"
    if not path.exists():
        return []
    text = path.read_text().strip().splitlines()
    out = ["### " + text[0].lstrip("# "), "", f"From [{path.relative_to(ROOT)}]({path.relative_to(ROOT)}).", ""]
    out += [("#" + ln if ln.startswith("#") else ln) for ln in text[1:]]
    return out + [""]


def classifier_note() -> str:
    """The claim classifier's accuracies, from a copy of its cache marker (``classifier.json``)."""
    path = RES / "minilm" / "classifier.json"
    if not path.exists():
        return ""
    c = json.loads(path.read_text())
    b = c.get("budget") or {}
    return (f"The classifier before editing ([{path.name}]({path.relative_to(ROOT)})): train accuracy "
            f"{_f(c.get('train_accuracy'))} on {c.get('n_train')} texts, held-out accuracy {_f(c.get('heldout_accuracy'))} "
            f"on {c.get('n_heldout')}, {_f(c.get('edit_prompt_accuracy'))} on the {c.get('n_edit_prompts')} stream prompts; "
            f"trained in {_f(c.get('train_seconds'))} s ({b.get('epochs')} epochs, top {b.get('train_layers')} layers, "
            f"{b.get('threads')} thread).")


def missed_targets(folder: str, targets: dict[str, float]) -> str:
    """`` (missed: Gen.; see Known gaps)`` for the metrics of a run below their targets, by exact
    match and, where the run has them, by EasyEdit's token accuracy (Rel./Gen.)."""
    s = load_summary(folder)
    if s is None:
        return ""
    m, sc = s.get("metrics") or {}, s.get("scores") or {}
    low = [f"{k}." for k, t in targets.items() if k in m and m[k] is not None and m[k] < t]
    text = f" (exact match: missed {', '.join(low)}; see Known gaps" if low else " (exact match: all met"
    tok = {k: sc.get(f"{k}_tok", m.get(k)) for k in targets if k in m}
    if sc.get("Gen_tok") is not None:
        low_tok = [f"{k}." for k, t in targets.items() if tok.get(k) is not None and tok[k] < t]
        text += f"; EasyEdit's token accuracy: {'missed ' + ', '.join(low_tok) if low_tok else 'all met'}"
    return text + ")"


def ns_gap(folder: str) -> str:
    """``; NS 0.053 below the unedited model's`` for a CounterFact run (empty without scores)."""
    path = RES / folder / "summary.json"
    if not path.exists():
        return ""
    sc = json.loads(path.read_text()).get("scores") or {}
    ns, ns0 = sc.get("NS"), (sc.get("pre") or {}).get("NS")
    if ns is None or ns0 is None:
        return ""
    return f"; NS {ns0 - ns:.3f} below the unedited model's ({'within' if ns0 - ns <= 0.05 else 'outside'} 0.05)"
