"""The model-level timed sections of ``gpu_check.py``: whole-model prefill/decode with patches,
milliseconds per edit, and patch storage against its formula (memory).
"""

from __future__ import annotations

import torch

from baselines import GatedFFN, make_patches
from fastpatch import PatchedFFN
from gpu_common import BIG, DEV, DRY, LOW, bench, env_var, smollm2_config


# --------------------------------------------------------------------- 6. whole model
def whole_model() -> list[dict]:
    from transformers import LlamaForCausalLM

    cfg = smollm2_config(rms_norm_eps=1e-5)
    rows = []
    for dtype in (LOW if not DRY else torch.float32,):
        model = LlamaForCausalLM(cfg).to(DEV, dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 128), device=DEV)
        pffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
        captured = {}
        h = pffn.ffn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].reshape(-1, 576)))
        with torch.no_grad():
            model(ids)
        h.remove()
        base_prefill = base_decode = None
        for P in ((0, 100) if DRY else (0, 1000, 10000)):
            pffn.bank.clear()
            if P:
                k_, b_, v_, _ = make_patches(captured["x"][-8:], P, 576)
                pffn.add_patches(k_, b_, v_)
            with torch.no_grad():
                prefill = bench(lambda: model(ids, use_cache=False), rep=40)
                out = model(ids, use_cache=True)
                cache = out.past_key_values
                nxt = ids[:, -1:]

                def decode():
                    model(nxt, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # drop the token just added: every call decodes at 128

                dec = bench(decode, rep=40)
            base_prefill = base_prefill or prefill["ms"]
            base_decode = base_decode or dec["ms"]
            rows.append({"model": "SmolLM2-135M architecture (random weights)", "dtype": str(dtype), "P": P,
                         "prefill128_ms": prefill["ms"], "decode_ms": dec["ms"],
                         "prefill_vs_unpatched": prefill["ms"] / base_prefill, "decode_vs_unpatched": dec["ms"] / base_decode})
        del model
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- 8. editing
def editing() -> list[dict]:
    """Seconds per edit on the GPU: SmolLM2-135M architecture (random weights, fp32), a
    40,000-vector memory, single-token targets the model gets wrong; default editor and the
    authors' init, same requests. Kernels run at their default launch configurations
    (``FASTPATCH_AUTOTUNE=0``): tuning every fp32 candidate would cost more lease time than the
    edits themselves."""
    with env_var("FASTPATCH_AUTOTUNE", "0"):
        return _editing()


def _editing() -> list[dict]:
    import statistics

    from transformers import LlamaForCausalLM

    from fastpatch.editor import Editor, EditorConfig, EditRequest

    cfg = smollm2_config()
    n_mem, n_edits = (2000, 3) if DRY else (40000, 20)

    tok = _id_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEV).eval()
    rows = []
    for name, ecfg in (("fastpatch", EditorConfig()), ("fastpatch, authors' init", EditorConfig.authors(max_steps=300))):
        ed = Editor(model, tok, ecfg)
        ed.memory.add(torch.randn(n_mem, 576, device=DEV) * 0.5)
        g = torch.Generator().manual_seed(1)
        secs, steps = [], []
        for i in range(n_edits + 2):  # the first two warm up kernels and caches
            ids = torch.randint(3, cfg.vocab_size, (8,), generator=g).tolist()
            prompt = " ".join(map(str, ids))
            with torch.no_grad():
                pred = int(model(torch.tensor([ids], device=DEV)).logits[0, -1].argmax())
            target = 3 + (pred + 1 + i) % (cfg.vocab_size - 3)
            torch.cuda.synchronize() if not DRY else None
            res = ed.edit(EditRequest(prompt, str(target), edit_id=f"g{name}{i}"))
            if i >= 2:
                secs.append(res.seconds)
                steps.append(res.steps)
        rows.append({"method": name, "edits": len(secs), "memory_vectors": len(ed.memory),
                     "median_ms_per_edit": 1e3 * statistics.median(secs), "p90_ms_per_edit": 1e3 * sorted(secs)[int(0.9 * (len(secs) - 1))],
                     "median_steps": statistics.median(steps)})
        ed.ffn.unwrap()
    return rows


def _id_tokenizer(vocab_size: int):
    """A real (word-level) Hugging Face tokenizer whose words are the token ids themselves:
    "17 4093 5" encodes to [17, 4093, 5]. Ids 0-2 are [PAD], [UNK] and </s>. The lease machine
    has no hub access, and the editing cost does not depend on the vocabulary's spelling."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{str(i): i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


# ---------------------------------------------------------------------------- 7. memory
def memory() -> dict:
    d, Fdim, P = BIG
    holder = torch.nn.Module()
    holder.mlp = GatedFFN(d, Fdim, dtype=LOW, device=DEV)
    w_ptrs = {p.data_ptr() for p in holder.mlp.parameters()}
    cuda = torch.cuda.is_available() and not DRY
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    pffn = PatchedFFN.wrap(holder, "mlp", capacity=16)
    x = torch.randn(16, d, device=DEV, dtype=LOW)
    for _ in range(10):  # grow by appends, as an edit stream does
        k_, b_, v_, _ = make_patches(x, P // 10, d)
        pffn.add_patches(k_, b_, v_)
    with torch.no_grad():
        pffn(x)
    storage = pffn.bank.storage_bytes()
    formula = P * (2 * d + 1) * 2
    still_same = {p.data_ptr() for p in pffn.ffn.parameters()} == w_ptrs
    return {"P": P, "d": d, "storage_bytes": storage, "formula_bytes": formula, "slack_ratio": storage / formula,
            "allocated_delta_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "base_weights_not_copied": still_same}
