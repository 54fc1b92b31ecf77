"""Whole-model latency of the SmolLM2-135M architecture with patches at its last MLP.

Prefill (one sequence of 64 tokens, no cache) and decode (one token on a KV cache of 64 tokens;
the cache is cropped back after every call) with 0, 1,000 and 10,000 patches, against the
unpatched model and the authors' concatenated-Linear patcher, in the same run.

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` with SmolLM2-135M's shapes (hidden
576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings) and RANDOM
weights: latency does not depend on the weight values, and no download is needed. Patches come
from ``make_patches`` on the last MLP's captured inputs (the decode token's first), so only a few
fire, as in a real edit stream.

Checks before timing: the wrapped model with zero patches gives bit-identical logits; with
patches, the last MLP's output matches the float64 reference ``FFN(x) + relu(x K^T + b) V`` on
its captured input, and at least one patch fires.

fp32, PyTorch backend (what ``auto`` picks on a CPU). Smoke mode (no ``--benchmark``) uses 4
layers and a 4096-token vocabulary, to stay fast.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import env as benv
from benchmarks.baselines import ConcatPatcher, make_patches
from fastpatch import PatchedFFN
from fastpatch.ffn import detect_layout
from fastpatch.kernels import reference as R
from fastpatch.kernels.testing import TOLERANCES

SEQ = 64
MLP_PATH = "model.layers.-1.mlp"
CASES = [("unpatched", 0), ("fastpatch", 0), ("fastpatch", 1000), ("fastpatch", 10000),
         ("concat (authors)", 1000), ("concat (authors)", 10000)]


def smollm2_config(full: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152 if full else 4096, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30 if full else 4, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=True, attn_implementation="sdpa",
    )


def _cache_kw(model) -> str:
    """transformers >= 5.x names the KV cache ``cache``; older versions ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class _Model:
    """The model, its inputs, the original last MLP, and the FFN inputs captured from it."""

    def __init__(self, full: bool) -> None:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        self.cfg = smollm2_config(full)
        self.model = LlamaForCausalLM(self.cfg).to(torch.float32).eval()
        self.layers = self.model.model.layers
        self.mlp = self.layers[-1].mlp
        self.layout = detect_layout(self.mlp)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.cfg.vocab_size, (1, SEQ), generator=g)
        self.next_id = torch.randint(0, self.cfg.vocab_size, (1, 1), generator=g)
        cap = {}
        h = self.mlp.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].reshape(-1, a[0].shape[-1]).clone()))
        with torch.no_grad():
            out = self.model(self.ids, use_cache=True)
            self.logits_prefill = out.logits
            x_prefill = cap["x"]
            self.kv = _cache_kw(self.model)
            self.logits_decode = self.model(self.next_id, use_cache=True, **{self.kv: _out_cache(out)}).logits
            x_decode = cap["x"]
        h.remove()
        # The decode token first: make_patches builds firing patches for the first tokens.
        self.x_capture = torch.cat([x_decode, x_prefill], 0)
        self.patches: dict[int, tuple] = {}

    def patch_set(self, P: int):
        if P not in self.patches:
            self.patches.clear()
            self.patches[P] = make_patches(self.x_capture, P, self.cfg.hidden_size, seed=P)
        return self.patches[P]

    def install(self, method: str, P: int):
        """Put the method's last MLP in place; return a restore function."""
        layer = self.layers[-1]
        if method == "unpatched":
            return lambda: None
        if method == "fastpatch":
            pffn = PatchedFFN.wrap(self.model, MLP_PATH, backend="torch")
            if P:
                k, b, v, _ = self.patch_set(P)
                pffn.add_patches(k, b, v)
            return pffn.unwrap
        if method == "concat (authors)":
            k, b, v, _ = self.patch_set(P)
            layer.mlp = ConcatPatcher(self.layout, k, b, v)

            def restore():
                layer.mlp = self.mlp
            return restore
        raise KeyError(method)

    def reference_mlp(self, x: torch.Tensor, P: int) -> torch.Tensor:
        lay = self.layout
        ref = R.patched_ffn_reference(x.double(), lay.w_up.double(), lay.w_down.double(), R.ACT_SILU,
                                      w_gate=lay.w_gate.double())
        if P:
            k, b, v, _ = self.patch_set(P)
            ref = R.patch_forward_reference(x.double(), k.double(), b.double(), v.double(), ref)
        return ref


    def unpatched(self, call):
        """``call`` run with the original last MLP swapped in for the moment (the paired baseline)."""
        layer = self.layers[-1]

        def run():
            cur = layer.mlp
            layer.mlp = self.mlp
            try:
                return call()
            finally:
                layer.mlp = cur
        return run


_MODEL: dict = {}


@pytest.fixture(scope="module")
def smol(full) -> _Model:
    if full not in _MODEL:
        _MODEL.clear()
        _MODEL[full] = _Model(full)
    return _MODEL[full]


def _check_call(m: _Model, call, method: str, P: int, want_logits: torch.Tensor) -> dict:
    """Run ``call`` once with the last MLP hooked; check it against the float64 reference."""
    cap = {}
    mod = m.layers[-1].mlp
    h = mod.register_forward_hook(lambda mm, a, out: cap.update(x=a[0].reshape(-1, a[0].shape[-1]), y=out.reshape(-1, out.shape[-1])))
    try:
        logits = call()
    finally:
        h.remove()
    info = {}
    if P == 0:
        # fastpatch with no patches runs the original FFN: bit for bit the unpatched model.
        assert torch.equal(logits, want_logits), f"{method} P=0 changed the logits"
        info["max_abs_err"] = 0.0
        return info
    ref = m.reference_mlp(cap["x"], P)
    atol, rtol = TOLERANCES[torch.float32]
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(cap["y"].double(), ref, atol=atol * scale, rtol=rtol)
    k, b, _, _ = m.patch_set(P)
    fire = (cap["x"] @ k.t() + b) > 0
    fired = int(fire.sum())
    assert fired > 0, "no patch fires on this input: the benchmark would not exercise the patch path"
    info.update(max_abs_err=float((cap["y"].double() - ref).abs().max()), firing_pairs=fired,
                firing_patches=int(fire.any(0).sum()))
    return info


def _measure(benchmark, paired, m: _Model, call, method: str, P: int, reference, group: str, extra: dict) -> None:
    """Check ``call`` against the reference logits, time it, pair it with the unpatched model."""
    info = _check_call(m, call, method, P, reference)
    benchmark.group = group
    benchmark.extra_info.update({
        "kind": "model", **extra, "method": method, "P": P,
        "layers": m.cfg.num_hidden_layers, "vocab": m.cfg.vocab_size, "weights": "random",
        "dtype": "float32", **info, "rss_bytes": benv.rss_bytes(),
    })
    benchmark(call)
    if method != "unpatched":
        paired(benchmark.extra_info, call, m.unpatched(call))
    benchmark.extra_info["peak_rss_bytes"] = benv.peak_rss_bytes()


def _ids(cases):
    return [f"{m.split()[0]}-P{p}" for m, p in cases]


@pytest.mark.parametrize("method,P", CASES, ids=_ids(CASES))
def test_model_prefill(benchmark, smol: _Model, paired, method: str, P: int) -> None:
    m = smol
    restore = m.install(method, P)
    try:
        call = lambda: m.model(m.ids, use_cache=False).logits  # noqa: E731
        _measure(benchmark, paired, m, call, method, P, m.logits_prefill,
                 f"model prefill (SmolLM2 arch, {SEQ} tokens)", {"phase": "prefill", "tokens": SEQ})
    finally:
        restore()


@pytest.mark.parametrize("method,P", CASES, ids=_ids(CASES))
def test_model_decode(benchmark, smol: _Model, paired, method: str, P: int) -> None:
    m = smol
    restore = m.install(method, P)
    try:
        cache = _out_cache(m.model(m.ids, use_cache=True))
        assert cache.get_seq_length() == SEQ

        def decode():
            logits = m.model(m.next_id, use_cache=True, **{m.kv: cache}).logits
            cache.crop(-1)  # back to SEQ tokens: every call decodes on a cache of SEQ
            return logits

        _measure(benchmark, paired, m, decode, method, P, m.logits_decode,
                 f"model decode (SmolLM2 arch, 1 token, KV cache {SEQ})", {"phase": "decode", "kv_cache": SEQ})
        assert cache.get_seq_length() == SEQ
    finally:
        restore()
