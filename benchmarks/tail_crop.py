"""What the cropped deep tail saves: one training step (forward and backward through the layers
after the patched FFN) with the re-run cropped to each view's first firing position, against the
full re-run, on SmolLM2-135M with the subject key at layer 18 (its preset).

    python benchmarks/tail_crop.py [--requests 8] [--data ../shared/data/counterfact/...json]
        [--out benchmarks/results/cpu/<tag>-tail-crop]

Requests: the capitals among the first ``2 * --requests`` (built in) that SmolLM2 gets wrong, and, with ``--data``, the first records of
an edit stream that name their subject. Each request's views (as given, behind the context
prefixes, the phrasing views of the stream so far) are captured as an edit captures them, its
neuron is initialised as an edit initialises it, and the two re-runs are timed in interleaved
pairs (``env.paired_ratio``), so other processes' load hits both alike. Also records the
fraction of positions the crop re-runs and the largest difference between the two features.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from env import cpu_results_dir, environment, paired_ratio, save_results

LAYER = "model.layers.18.mlp"


def _requests(n: int, data: str | None) -> list[Any]:
    from fastpatch.app.geography import geography_records
    from fastpatch.editor import EditRequest

    reqs = [EditRequest(r.prompt, r.target, subject=r.subject, edit_id=f"cap-{i}")
            for i, r in enumerate(geography_records()[: 2 * n])]
    if data:
        from fastpatch.data.formats import load_stream

        recs = [r for r in load_stream(data).records if r.subject and r.subject in r.prompt][:n]
        reqs += [EditRequest(r.prompt, r.target, subject=r.subject, edit_id=f"data-{i}") for i, r in enumerate(recs)]
    return reqs


def measure(reqs: list[Any]) -> list[dict[str, Any]]:
    """Per request: the paired time ratio (cropped / full) of one step and what the crop re-runs."""
    from fastpatch.app.registry import find_model
    from fastpatch.editor import Editor, EditorConfig
    from fastpatch.editor.deep_tail import seq_features
    from fastpatch.editor.init import init_params
    from fastpatch.editor.tail_crop import crop_plan

    model, tok = find_model("smollm2").load(torch.float32)
    ed = Editor(model, tok, EditorConfig(key_position="subject"), module_path=LAYER)
    ed.build_memory(["The weather is nice today.", "A river runs through the old town."])
    layers, norm, act = ed.adapter.seq_layers, ed.adapter.features, ed.ffn.patch_act
    rows = []
    for req in reqs:
        batch = ed._prepare([req])
        if not batch.neurons:  # the model already answers it: nothing to train
            continue
        st = batch.seq()
        p = init_params(ed.handle, ed.config, ed.memory, batch, 0)
        K, b, V = p["keys"].detach(), p["bias"].detach(), (p["amp"] * p["v_dir"]).detach()

        def step(crop: bool) -> None:
            k = K.clone().requires_grad_(True)
            seq_features(layers, norm, st, k, b, V, act, crop=crop).sum().backward()

        with torch.no_grad():
            diff = float((seq_features(layers, norm, st, K, b, V, act, crop=True)
                          - seq_features(layers, norm, st, K, b, V, act, crop=False)).abs().max())
            start = crop_plan(((st.x @ K.t() + b) > 0).any(-1), st.valid, st.first_label)
        real = int(st.valid.sum())
        rerun = real if start is None else int((st.valid.sum(1) - start).sum())
        r = paired_ratio(lambda: step(True), lambda: step(False), budget_s=3.0, min_pairs=5, max_pairs=15)
        rows.append({"id": req.edit_id, "prompt": req.prompt, "views": int(st.valid.shape[0]), "positions": real,
                     "rerun_positions": rerun, "croppable": st.croppable(layers), "max_abs_diff": diff, **r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(_requests(args.requests, args.data))
    ratio = statistics.median(r["ratio"] for r in rows)
    frac = sum(r["rerun_positions"] for r in rows) / sum(r["positions"] for r in rows)
    data = {"env": environment(), "layer": LAYER, "median_ratio": ratio, "rerun_fraction": frac, "rows": rows}
    md = ["# The cropped deep tail: one training step, cropped / full re-run (SmolLM2-135M, layer 18, subject key)",
          "",
          f"Median time ratio {ratio:.2f} over {len(rows)} requests; the crop re-runs {frac:.0%} of the positions. "
          "Timed in interleaved pairs (other load hits both alike).",
          "", "| request | views | positions | re-run | full (s) | cropped (s) | ratio | max diff |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['prompt'][:48]} | {r['views']} | {r['positions']} | {r['rerun_positions']} | {r['base_median_s']:.3f} "
           f"| {r['median_s']:.3f} | {r['ratio']:.2f} | {r['max_abs_diff']:.1e} |" for r in rows]
    out = args.out or str(cpu_results_dir().parent / f"{cpu_results_dir().name}-tail-crop")
    save_results(out, "tail_crop", data, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
