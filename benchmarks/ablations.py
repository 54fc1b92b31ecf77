"""Which editor settings make edits general and local: one ``fastpatch run`` per (stream, variant)
on the first edits of the shared zsRE and CounterFact streams and on the built-in capitals (the
demo's stream), collected into one table.

    python benchmarks/ablations.py --shared ../shared/data --out runs/ablations           # run all
    python benchmarks/ablations.py --shared ../shared/data --out runs/ablations --only cf-neg8
    python benchmarks/ablations.py --collect runs/ablations                                # table only
    python benchmarks/ablations.py --collect benchmarks/results/ablations                  # the committed runs

Every run is ``fastpatch run --model smollm2 --protocol easyedit --limit 200 --eval-every 0`` with
the variant's ``--set``/``--module-path`` arguments (the capitals: ``make demo``'s run, the T-Patcher
protocol over all 194 requests), its directory ``<out>/<stream>-<variant>``
(a finished run is not run again). The table (Rel/Gen/Loc, the CounterFact scores and the median
seconds per edit of every run) goes to ``benchmarks/results/cpu/ablations.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from env import RESULTS_DIR, environment, save_results

#: The streams: name -> file under the shared data folder, or a built-in stream's name.
STREAMS = {
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
    "cf": "counterfact/easyedit_format/counterfact-edit.json",
    "capitals": "geography",
}
#: Built-in streams: run as ``make demo`` runs them (their protocol, every request), not from --shared.
BUILTIN: dict[str, list[str]] = {"capitals": ["--protocol", "tpatcher"]}
#: The variants: name -> (what it tests, extra CLI arguments). ``base`` is the default config.
#: The variants: name -> (what it tests, extra CLI arguments). Each single idea is tried on top of
#: ``prev`` (the default before the hard negatives), so its row differs from ``prev`` by that idea
#: alone; ``neg8`` is the default now.
PREV = ["--set", "negatives=0", "--set", "negative_whiten=0", "--set", "phrasings=0"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "prev": ("the previous default (no hard negatives)", PREV),
    "authors": ("the authors' T-Patcher (EditorConfig.authors())",
                ["--set", "init=authors", "--set", "value_init=random", "--set", "augment=0",
                 "--set", "loss_vocab=0", "--set", "max_neurons=5", *PREV]),
    "neg8": ("hard negatives: 8 subject-swapped prompts per edit in its memory loss (the default before the "
             "phrasing views)",
             ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=0"]),
    "neg8w": ("hard negatives (8), also whitening the key init (weight 1)",
              ["--set", "negatives=8", "--set", "negative_whiten=1.0", "--set", "phrasings=0"]),
    "neg16w4": ("hard negatives (16), whitening weight 4",
                ["--set", "negatives=16", "--set", "negative_whiten=4.0", "--set", "phrasings=0"]),
    "neg32w8": ("hard negatives (32), whitening weight 8", ["--set", "negatives=32", "--set", "negative_whiten=8.0", "--set", "phrasings=0"]),
    "vs0": ("neg8 with the key whitened without the context variants' scatter (view_scatter=0)",
            ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "view_scatter=0", "--set", "phrasings=0"]),
    "kb25": ("neg8 with the key's zero a quarter of the way from the memory to the edit (key_boundary=0.25)",
             ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "key_boundary=0.25", "--set", "phrasings=0"]),
    "kb25vs0": ("kb25 and vs0 together", ["--set", "negatives=8", "--set", "negative_whiten=0",
                                          "--set", "key_boundary=0.25", "--set", "view_scatter=0", "--set", "phrasings=0"]),
    "cfval": ("neg8 with the memory from CounterFact's held-out split (1,000 of the prompts, paraphrases and "
              "neighbourhood prompts of counterfact-val.json, disjoint from the evaluated records) instead of the "
              "default corpus, as the T-Patcher authors take the memory from the training split",
              ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=0",
               "--memory", "{shared}/counterfact/easyedit_format/counterfact-val.json", "--memory-limit", "1000"]),
    "phr4": ("neg8 with 4 phrasing views per edit: the edit's relation asked the ways other requests with the "
             "same prompt template were paraphrased (earlier requests of the stream only), about this subject; "
             "never the edit's own evaluated paraphrase: **the default now**",
             ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=4"]),
    "cfvalphr4": ("cfval with 4 phrasing views per edit, learnt from the held-out split's prompts and paraphrases "
                  "and the earlier requests (never the edit's own evaluated paraphrase)",
                  ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=4",
                   "--memory", "{shared}/counterfact/easyedit_format/counterfact-val.json", "--memory-limit", "1000"]),
    "phr4n": ("phr4 with the hard negatives' other subjects put into the phrasing views too (negative_views)",
              ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=4",
               "--set", "negative_views=true"]),
    "cfvalphr4n": ("cfvalphr4 with the hard negatives' other subjects put into the phrasing views too "
                   "(negative_views)",
                   ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=4",
                    "--set", "negative_views=true",
                    "--memory", "{shared}/counterfact/easyedit_format/counterfact-val.json", "--memory-limit", "1000"]),
    "memlab": ("memory grows by the label positions of each edit only", [*PREV, "--set", "memory_growth=labels"]),
    "memnone": ("memory stays the corpus (no edit inputs)", [*PREV, "--set", "memory_growth=none"]),
    "aug0": ("no generated context variants (augment=0)", [*PREV, "--set", "augment=0"]),
}
#: Which layer (on top of the default, phr4; on CounterFact on top of cfvalphr4): the MLP of an
#: earlier layer of SmolLM2's 30, trained through the deep tail (the layers after it re-run).
_PHR4 = ["--set", "negatives=8", "--set", "negative_whiten=0", "--set", "phrasings=4"]
_CFVAL = ["--memory", "{shared}/counterfact/easyedit_format/counterfact-val.json", "--memory-limit", "1000"]
for _layer in (26, 22, 18):
    VARIANTS[f"L{_layer}"] = (f"phr4 patching layer {_layer} of 0-29 instead of the last (the deep tail re-runs the "
                              f"{29 - _layer} layers after it)", [*_PHR4, "--module-path", f"model.layers.{_layer}.mlp"])
    VARIANTS[f"cfvalL{_layer}"] = (f"cfvalphr4 patching layer {_layer} instead of the last",
                                   [*_PHR4, *_CFVAL, "--module-path", f"model.layers.{_layer}.mlp"])
    # where the key reads: the subject's last token (one neuron per edit) at that layer
    _SUBJ = ["--set", "key_position=subject", "--module-path", f"model.layers.{_layer}.mlp"]
    VARIANTS[f"L{_layer}subj"] = (f"L{_layer} with the key at the subject's last token (key_position=subject)",
                                  [*_PHR4, *_SUBJ])
    VARIANTS[f"cfvalL{_layer}subj"] = (f"cfvalL{_layer} with the key at the subject's last token",
                                       [*_PHR4, *_CFVAL, *_SUBJ])
    _BOTH = ["--set", "key_position=both", "--module-path", f"model.layers.{_layer}.mlp"]
    VARIANTS[f"L{_layer}both"] = (f"L{_layer} with the last-token neurons and a subject neuron (key_position=both)",
                                  [*_PHR4, *_BOTH])
    VARIANTS[f"cfvalL{_layer}both"] = (f"cfvalL{_layer} with the last-token neurons and a subject neuron",
                                       [*_PHR4, *_CFVAL, *_BOTH])
#: The preset (the subject key at layer 18) on zsRE/capitals and on CounterFact, which each idea
#: below is added to.
_L18S = [*_PHR4, "--set", "key_position=subject", "--module-path", "model.layers.18.mlp"]
_CFL18S = [*_PHR4, *_CFVAL, "--set", "key_position=subject", "--module-path", "model.layers.18.mlp"]
#: A raised threshold (``fire_threshold``).
_FT = ["--set", "fire_threshold=0.3"]
VARIANTS["L18subjft3"] = ("L18subj with each patch's threshold raised to 0.3 of its activation on its edit "
                          "(fire_threshold=0.3)", [*_L18S, *_FT])
VARIANTS["cfvalL18subjft3"] = ("cfvalL18subj with fire_threshold=0.3", [*_CFL18S, *_FT])
#: Subject-context views (``subject_context``).
_SC = ["--set", "subject_context=1"]
VARIANTS["L18subjsc1"] = ("L18subj with one subject-context view per edit: the model's continuation of the subject "
                          "before the prompt, so the key also learns a second mention (subject_context=1)",
                          [*_L18S, *_SC])
VARIANTS["cfvalL18subjsc1"] = ("cfvalL18subj with subject_context=1", [*_CFL18S, *_SC])
VARIANTS["L18subjsc3"] = ("L18subj with three subject-context views per edit (subject_context=3)",
                          [*_L18S, "--set", "subject_context=3"])
#: The amplifier search's fallback (``amplifier_fallback``).
_LL = ["--set", "amplifier_fallback=lowest_loss"]
VARIANTS["L18subjll"] = ("L18subj starting, where no doubling of the amplifier makes the edit right, from the doubling "
                         "with the lowest edit loss instead of 2^10 times the start (amplifier_fallback=lowest_loss)",
                         [*_L18S, *_LL])
VARIANTS["cfvalL18subjll"] = ("cfvalL18subj with amplifier_fallback=lowest_loss", [*_CFL18S, *_LL])
#: A larger value margin (``value_margin``): the found amplifier times 4 instead of 2.
_VM = ["--set", "value_margin=4"]
VARIANTS["L18subjvm4"] = ("L18subj with the amplifier found by the search doubled once more (value_margin=4), for "
                          "paraphrases on which the patch fires weakly", [*_L18S, *_VM])
VARIANTS["cfvalL18subjvm4"] = ("cfvalL18subj with value_margin=4", [*_CFL18S, *_VM])
#: Variants that apply to some streams only.
ONLY_ON: dict[str, tuple[str, ...]] = {"cfval": ("cf",), "cfvalphr4": ("cf",), "cfvalphr4n": ("cf",),
                                       **{f"cfvalL{k}{s}": ("cf",) for k in (26, 22, 18) for s in ("", "subj", "both")},
                                       **{f"L{k}{s}": ("zsre", "capitals") for k in (26, 22, 18) for s in ("", "subj", "both")},
                                       "L18subjft3": ("zsre", "capitals"), "cfvalL18subjft3": ("cf",),
                                       "L18subjsc1": ("zsre", "capitals"), "cfvalL18subjsc1": ("cf",),
                                       "L18subjsc3": ("zsre", "capitals"),
                                       "L18subjll": ("zsre", "capitals"), "cfvalL18subjll": ("cf",),
                                       "L18subjvm4": ("zsre", "capitals"), "cfvalL18subjvm4": ("cf",)}
RUN_ARGS = ["--model", "smollm2", "--eval-every", "0", "--no-progress", "--no-plots",
            "--no-general-ability", "--no-generation-metrics"]
COLUMNS = ("Rel", "Gen", "GR", "Loc", "NS", "ES", "PS", "PPL", "fire", "sec/edit")


def run_one(shared: Path, out: Path, stream: str, variant: str, limit: int) -> Path:
    """Run one (stream, variant) unless its directory already holds a finished run; its directory."""
    d = out / f"{stream}-{variant}"
    if (d / "summary.json").is_file() and json.loads((d / "summary.json").read_text()).get("complete"):
        return d
    args = VARIANTS[variant][1]
    if variant in ONLY_ON and stream not in ONLY_ON[variant]:
        return d
    args = [a.replace("{shared}", str(shared)) for a in args]
    if "--module-path" not in args:  # the last FFN, whatever the built-in model's preset
        args += ["--module-path", "model.layers.-1.mlp"]
    if stream in BUILTIN:
        data, extra = STREAMS[stream], BUILTIN[stream]
    else:
        data, extra = str(shared / STREAMS[stream]), ["--protocol", "easyedit", "--limit", str(limit)]
    cmd = [sys.executable, "-m", "fastpatch.cli", "run", "--data", data, "--out", str(d), "--overwrite",
           *RUN_ARGS, *extra, *args]
    subprocess.run(cmd, check=True)
    return d


def ability(d: Path) -> dict[str, float] | None:
    """General ability after the run, from its final checkpoint (cached in ``<run>/ability.json``):
    perplexity on the held-out texts of :func:`fastpatch.app.geography.general_ability_sets`
    with and without the patches, and the fraction of the first 100 texts on which some patch fires."""
    cache = d / "ability.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from fastpatch.run import latest_checkpoint

    ckpt = latest_checkpoint(d)
    if ckpt is None:
        return None
    from fastpatch.app.geography import general_ability_sets
    from fastpatch.app.registry import resolve_model
    from fastpatch.atomic import write_json_atomic
    from fastpatch.editor import Editor

    texts, _ = general_ability_sets()
    model, tok = resolve_model("smollm2")
    ed = Editor.load(ckpt / "editor", model, tok)
    with ed.ffn.patches_disabled():
        ppl0 = ed.perplexity(texts)
    fire = float((ed.activations(texts[:100]) > 0).any(1).float().mean())
    out = {"ppl0": ppl0, "ppl": ed.perplexity(texts), "texts_with_a_firing_patch": fire, "patches": ed.num_patches}
    write_json_atomic(cache, out)
    return out


def row(d: Path) -> dict[str, float | None] | None:
    """The table row of one run directory (None when it has no finished summary)."""
    p = d / "summary.json"
    if not p.is_file():
        return None
    s = json.loads(p.read_text())
    if not s.get("complete"):  # a run stopped before its end: its figures are of fewer edits
        return None
    m, sc = s.get("metrics") or {}, s.get("scores") or {}
    return {"Rel": m.get("Rel"), "Gen": m.get("Gen"), "GR": m.get("GR"), "Loc": m.get("Loc"), "NS": sc.get("NS"), "ES": sc.get("ES"),
            "PS": sc.get("PS"), "NS_pre": (sc.get("pre") or {}).get("NS"),
            "sec/edit": (s.get("time") or {}).get("edit_seconds_median"), "edits": s.get("edits"),
            "patches": s.get("patches"), **_ability_columns(d)}


def _ability_columns(d: Path) -> dict[str, float | None]:
    """PPL (and the unedited PPL_0) and the fraction of held-out texts a patch fires on, when known."""
    a = json.loads((d / "ability.json").read_text()) if (d / "ability.json").is_file() else None
    if a is None:
        return {}
    return {"PPL": a["ppl"], "PPL_0": a["ppl0"], "fire": a["texts_with_a_firing_patch"]}


def collect(out: Path) -> dict[str, dict[str, dict]]:
    """``{stream: {variant: row}}`` of every finished run under ``out``."""
    table: dict[str, dict[str, dict]] = {}
    for stream in STREAMS:
        for variant in VARIANTS:
            r = row(out / f"{stream}-{variant}")
            if r is not None:
                table.setdefault(stream, {})[variant] = r
    return table


def markdown(table: dict[str, dict[str, dict]], note: str = "") -> str:
    """One table per stream: a row per variant."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["# Ablations: first 200 edits of the shared streams (SmolLM2-135M, CPU, EasyEdit protocol) "
             "and the capitals", ""]
    if note:
        lines += [note, ""]
    for stream, rows in table.items():
        pre = next((r["NS_pre"] for r in rows.values() if r.get("NS_pre") is not None), None)
        ppl0 = next((r["PPL_0"] for r in rows.values() if r.get("PPL_0") is not None), None)
        heading = ", ".join(x for x in (f"unedited NS {pre:.3f}" if pre is not None else "",
                                        f"unedited PPL {ppl0:.1f}" if ppl0 is not None else "") if x)
        lines += [f"## {stream}" + (f" ({heading})" if heading else ""), "",
                  "| variant | what | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
        for name, r in rows.items():
            lines.append(f"| {name} | {VARIANTS[name][0]} | " + " | ".join(f(r.get(c)) for c in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run (or only collect) the ablation grid and save its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=None, help="the shared data folder (holds zsre/ and counterfact/)")
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"), help="where the runs go")
    ap.add_argument("--collect", type=Path, default=None, help="only collect the runs in this folder")
    ap.add_argument("--only", nargs="*", default=None, help="run only these <stream>-<variant> names")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--ability", action="store_true",
                    help="also measure held-out perplexity and patch firing from each run's final checkpoint")
    ap.add_argument("--note", default="", help="a line printed above the tables (e.g. how the machine was loaded)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "cpu", help="where ablations.{json,md} go")
    args = ap.parse_args(argv)
    out = args.collect or args.out
    if args.collect is None:
        if args.shared is None:
            ap.error("--shared is needed to run the grid (or --collect DIR)")
        for stream in STREAMS:
            for variant in VARIANTS:
                if args.only is None or f"{stream}-{variant}" in args.only:
                    run_one(args.shared, out, stream, variant, args.limit)
    if args.ability:
        for stream in STREAMS:
            for variant in VARIANTS:
                ability(out / f"{stream}-{variant}")
    table = collect(out)
    md = markdown(table, args.note)
    save_results(args.results, "ablations", {"environment": environment(), "limit": args.limit,
                                             "variants": {k: {"what": w, "args": a} for k, (w, a) in VARIANTS.items()},
                                             "table": table}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
