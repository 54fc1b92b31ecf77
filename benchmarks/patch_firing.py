"""Why paraphrases fail and neighbours break: how strongly each edit's own patches fire on its
prompt, its paraphrases and its locality prompts, from a finished run's final checkpoint.

    python benchmarks/patch_firing.py runs/zsre --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json
    python benchmarks/patch_firing.py runs/demo --data geography --where subject      # a subject key

For the first ``--limit`` requests of the run, the FFN input at the last prompt token (where the
first target token is predicted) of every evaluated text goes through the keys and biases of the
request's own patches (``PatchBank.ids_for_edit``); the largest pre-activation is its "firing".
Each paraphrase is then put in a bin by its firing relative to the prompt's, and the bins are
crossed with whether the paraphrase was right at the end (``per_request.jsonl``):

* ``silent`` (<= 0): the key does not match the paraphrase: a key problem;
* ``weak`` (below half the prompt's): the patch fires, too little to carry the value;
* ``strong``: the patch fires as on the prompt, and the answer is still wrong: the value does not
  transfer to the paraphrase's context (or another patch wins).

Locality prompts the own patches fire on are counted the same way. Output: ``<run>/firing.md`` and
``<run>/firing.json`` (and printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


from fastpatch.atomic import write_atomic, write_json_atomic
from fastpatch.data.formats import load_stream


def firing(ed: Any, texts: list[str], rows: list[int], where: str = "last", subject: str | None = None) -> list[float]:
    """The largest pre-activation of the patches in ``rows`` in each text: at its last token
    (``where="last"``), at any token (``"any"``), or at the last mention of ``subject``
    (``"subject"``: where a subject key reads; any token in a text without it)."""
    from fastpatch.editor.encoding import subject_last_token

    keys, biases = ed.ffn.bank.keys[rows].float(), ed.ffn.bank.biases[rows].float()
    out = []
    for text, x in zip(texts, ed.ffn_inputs(texts)):
        pos = subject_last_token(ed.tokenizer, text, subject) if where == "subject" and subject else None
        x = x[-1:] if where == "last" else x[pos : pos + 1] if pos is not None else x
        out.append(float((x.float().to(keys.device) @ keys.T + biases).max()))
    return out


def _records(data: str) -> list[Any]:
    """The stream's records: a file, or the built-in ``geography`` capitals."""
    if data == "geography":
        from fastpatch.app.geography import geography_records

        return geography_records()
    return load_stream(data).records


WHERE = {"last": "at the last prompt token", "subject": "at the last mention of the subject",
         "any": "anywhere in the text"}


def bin_of(act: float, prompt_act: float) -> str:
    """``silent``, ``weak`` or ``strong`` (see the module docstring)."""
    if act <= 0:
        return "silent"
    return "weak" if act < 0.5 * prompt_act else "strong"


def measure(run: Path, data: str, limit: int, model: str, where: str = "last") -> dict[str, Any]:
    """Per-request firing on prompt, paraphrases and locality prompts, with the final results."""
    from fastpatch.app.registry import resolve_model
    from fastpatch.editor import Editor
    from fastpatch.run import latest_checkpoint

    final = {str(r["id"]): r for r in map(json.loads, (run / "per_request.jsonl").read_text().splitlines()) if r}
    recs = [r for r in _records(data) if str(r.id) in final][:limit]
    mdl, tok = resolve_model(model)
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    index = {pid: k for k, pid in enumerate(ed.ffn.bank.ids)}
    out = []
    for r in recs:
        rows = [index[p] for p in ed.ffn.bank.ids_for_edit(str(r.id))]
        res = final[str(r.id)]
        if not rows:
            out.append({"id": r.id, "patches": 0})
            continue
        loc = [p for p, _ in r.locality]
        acts = firing(ed, [r.prompt, *r.rephrases, *loc], rows, where, r.subject)
        n = 1 + len(r.rephrases)
        out.append({"id": r.id, "patches": len(rows), "prompt": acts[0], "rel": res["rel"],
                    "para": [[a, ok] for a, ok in zip(acts[1:n], res.get("gen") or [])],
                    "loc": [[a, s] for a, s in zip(acts[n:], res.get("loc") or [])]})
    return {"run": str(run), "data": str(data), "where": where, "requests": len(out), "per_request": out}


def summarise(m: dict[str, Any]) -> str:
    """The Markdown tables of :func:`measure`'s output."""
    para: dict[tuple[str, bool], int] = {}
    loc: dict[tuple[str, bool], int] = {}
    for r in m["per_request"]:
        if not r.get("patches"):
            continue
        for a, ok in r["para"]:
            key = (bin_of(a, r["prompt"]), bool(ok))
            para[key] = para.get(key, 0) + 1
        for a, s in r["loc"]:
            key = (bin_of(a, r["prompt"]), s >= 1.0)
            loc[key] = loc.get(key, 0) + 1
    lines = [f"# Patch firing: {m['run']} (first {m['requests']} requests)", "",
             f"Firing of a request's own patches ({WHERE[m.get('where', 'last')]}), relative to its prompt's.", "",
             "| text | firing | right / kept | wrong / changed | share of the wrong ones |", "|---|---|---|---|---|"]
    for name, table in (("paraphrase", para), ("locality prompt", loc)):
        wrong = sum(v for (b, ok), v in table.items() if not ok) or 1
        for b in ("silent", "weak", "strong"):
            good, bad = table.get((b, True), 0), table.get((b, False), 0)
            lines.append(f"| {name} | {b} | {good} | {bad} | {bad / wrong:.2f} |")
    lines += ["", "By paraphrase (its place in the record's list): right, and its firing relative to the prompt's "
              "(median over the requests with patches).", "", "| paraphrase | right | wrong | median firing ratio |",
              "|---|---|---|---|"]
    by: dict[int, list[tuple[float, bool]]] = {}
    for r in m["per_request"]:
        if r.get("patches") and r["prompt"] > 0:
            for i, (a, ok) in enumerate(r["para"]):
                by.setdefault(i, []).append((a / r["prompt"], bool(ok)))
    for i, xs in sorted(by.items()):
        ratios = sorted(a for a, _ in xs)
        lines.append(f"| {i} | {sum(ok for _, ok in xs)} | {sum(not ok for _, ok in xs)} | {ratios[len(ratios) // 2]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", required=True, help="the stream file, or 'geography' (the built-in capitals)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--where", choices=tuple(WHERE), default="last",
                    help="where to read the firing: the last token (a last-token key), the subject's last "
                         "mention (a subject key), or any token")
    args = ap.parse_args(argv)
    m = measure(args.run, args.data, args.limit, args.model, args.where)
    write_json_atomic(args.run / "firing.json", m)
    text = summarise(m)
    write_atomic(args.run / "firing.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
