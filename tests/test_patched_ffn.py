"""PatchedFFN on tiny Llama, GPT-2, BERT, T5 and BART built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastpatch import PatchedFFN, UnknownLayoutError
from fastpatch.ffn import detect_layout, resolve_module
from fastpatch.kernels.reference import activation_reference

from .conftest import requires_triton
from .tiny_models import TINY, model_inputs

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _random_patches(ffn: PatchedFFN, n: int, active_bias: float = 0.0, dtype=torch.float32):
    d_in, d_out = ffn.bank.d_in, ffn.bank.d_out
    keys = torch.randn(n, d_in, dtype=dtype) / d_in**0.5
    # Mixed: some biases make a patch fire on most tokens, others keep it silent.
    biases = torch.where(torch.arange(n) % 2 == 0, torch.full((n,), active_bias), torch.full((n,), -50.0)).to(dtype)
    values = torch.randn(n, d_out, dtype=dtype)
    return keys, biases, values


def _reference_model(model: nn.Module, path: str, keys, biases, values, act=None) -> nn.Module:
    """A float64 copy of the unwrapped model with FFN(x) + act(x K^T + b) V added by hooks."""
    ref = copy.deepcopy(model).double()
    module, _, _ = resolve_module(ref, path)
    if isinstance(getattr(module, "DenseReluDense", None), nn.Module):
        module = module.DenseReluDense
    layout = detect_layout(module)
    K, b, V = keys.double(), biases.double(), values.double()
    act = act if act is not None else (lambda h: torch.relu(h))
    captured = {}

    def patch(x):
        return act(x @ K.t() + b) @ V

    if layout.kind == "split":
        layout.tap.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        layout.down.register_forward_hook(lambda m, a, out: out + patch(captured["x"]))
    else:
        module.register_forward_hook(lambda m, a, out: out + patch(a[0]))
    return ref


@pytest.mark.parametrize("name", list(TINY))
def test_zero_patches_is_bit_exact(name: str) -> None:
    build, path, _ = TINY[name]
    model = build()
    inputs = model_inputs(name)
    before = _logits(model, inputs)
    ffn = PatchedFFN.wrap(model, path)
    assert isinstance(resolve_module(model, ffn.module_path)[0], PatchedFFN) or ffn.layout.kind == "split"
    assert torch.equal(_logits(model, inputs), before)
    # add then remove: back to the original, bit for bit
    ids = ffn.add_patches(*_random_patches(ffn, 3))
    patched = _logits(model, inputs)
    assert not torch.equal(patched, before)
    # patches_disabled(): the original FFN alone (training patches ignored too), bank kept
    with ffn.patches_disabled():
        assert torch.equal(_logits(model, inputs), before)
        with ffn.training_patches(*_random_patches(ffn, 2)):
            assert torch.equal(_logits(model, inputs), before)
    assert ffn.num_patches == 3 and torch.equal(_logits(model, inputs), patched)
    ffn.remove(ids)
    assert torch.equal(_logits(model, inputs), before)
    ffn.unwrap()
    assert torch.equal(_logits(model, inputs), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TINY))
def test_patched_logits_match_float64_reference(name: str, backend: str, monkeypatch) -> None:
    monkeypatch.setenv("FASTPATCH_BACKEND", backend)
    build, path, _ = TINY[name]
    model = build()
    inputs = model_inputs(name)
    ffn = PatchedFFN.wrap(model, path)
    keys, biases, values = _random_patches(ffn, 7)
    ffn.add_patches(keys, biases, values)
    ref_model = _reference_model(model_unwrapped_copy(model, ffn), path, keys, biases, values)
    ref = _logits(ref_model, {k: v for k, v in inputs.items()})
    out = _logits(model, inputs)
    # the patches change the output for real
    assert (out - _logits(model_unwrapped_copy(model, ffn), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def model_unwrapped_copy(model: nn.Module, ffn: PatchedFFN) -> nn.Module:
    """A deep copy of ``model`` with the PatchedFFN replaced by the original module."""
    ffn_copy_holder = copy.deepcopy(model)
    for mod in ffn_copy_holder.modules():
        for name, child in list(mod.named_children()):
            if isinstance(child, PatchedFFN):
                if child._hook is not None:
                    child._hook.remove()
                setattr(mod, name, child.ffn)
    # deep-copied taps may still carry the copied hook of the wrapper: drop every pre-hook
    for mod in ffn_copy_holder.modules():
        mod._forward_pre_hooks.clear()
    return ffn_copy_holder


def _concat_host_neurons(model: nn.Module, path: str, keys, biases, values) -> nn.Module:
    """The authors' form: patch neurons appended to the FFN's own matrices (host activation)."""
    ref = copy.deepcopy(model)
    module, _, _ = resolve_module(ref, path)
    if isinstance(getattr(module, "DenseReluDense", None), nn.Module):
        module = module.DenseReluDense
    lay = detect_layout(module)
    up, down = lay.up, lay.down
    with torch.no_grad():
        if type(up).__name__ == "Conv1D":  # GPT-2: weight (in, out)
            up.weight = nn.Parameter(torch.cat([up.weight, keys.t()], 1))
            up.bias = nn.Parameter(torch.cat([up.bias, biases]))
            up.nf += keys.shape[0]
            down.weight = nn.Parameter(torch.cat([down.weight, values], 0))
        else:
            new_up = nn.Linear(up.in_features, up.out_features + keys.shape[0], bias=up.bias is not None)
            new_up.weight.copy_(torch.cat([up.weight, keys]))
            if up.bias is not None:
                new_up.bias.copy_(torch.cat([up.bias, biases]))
            new_down = nn.Linear(down.in_features + keys.shape[0], down.out_features, bias=down.bias is not None)
            new_down.weight.copy_(torch.cat([down.weight, values.t()], 1))
            if down.bias is not None:
                new_down.bias.copy_(down.bias)
            for owner in ref.modules():
                for name, child in list(owner.named_children()):
                    if child is up:
                        setattr(owner, name, new_up)
                    if child is down:
                        setattr(owner, name, new_down)
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "bart"])
def test_host_activation_equals_concatenated_neurons(name: str, backend: str, monkeypatch) -> None:
    monkeypatch.setenv("FASTPATCH_BACKEND", backend)
    build, path, _ = TINY[name]
    model = build()
    inputs = model_inputs(name)
    concat_src = copy.deepcopy(model)
    ffn = PatchedFFN.wrap(model, path, activation="host")
    keys, biases, values = _random_patches(ffn, 5, active_bias=0.5)
    if name == "t5":  # T5's wi has no bias: concatenated neurons cannot carry one
        biases = torch.zeros_like(biases)
    ffn.add_patches(keys, biases, values)
    ref = _logits(_concat_host_neurons(concat_src, path, keys, biases, values), inputs)
    torch.testing.assert_close(_logits(model, inputs), ref, atol=1e-4, rtol=1e-4)


def test_unknown_layout_lists_supported_families() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(UnknownLayoutError, match="gate_proj.*c_fc.*wi.*intermediate.*fc1"):
        PatchedFFN.wrap(model, "0")
    with pytest.raises(KeyError, match="out of range"):
        PatchedFFN.wrap(TINY["llama"][0](), "model.layers.5.mlp")
    with pytest.raises(KeyError, match="not a module"):
        PatchedFFN.wrap(TINY["llama"][0](), "model.layers.-1.nope")


@pytest.mark.parametrize("name", list(TINY))
def test_double_wrap_refused(name: str) -> None:
    """Every family says "already wrapped", not that the (BERT/BART/T5) layer is of an unknown layout."""
    build, path, _ = TINY[name]
    model = build()
    ffn = PatchedFFN.wrap(model, path)
    with pytest.raises(ValueError, match="already wrapped by a PatchedFFN"):
        PatchedFFN.wrap(model, path)
    ffn.unwrap()
    PatchedFFN.wrap(model, path)  # unwrapped: wraps again


@pytest.mark.parametrize("name", ["bert", "bart"])
def test_split_layout_keeps_no_activations_between_calls(name: str) -> None:
    """The captured FFN input is released by the call that uses it: after a forward with gradients
    on, the model deep-copies and pickles (without the activations) and the copy works."""
    import io

    build, path, _ = TINY[name]
    model = build()
    inputs = model_inputs(name)
    ffn = PatchedFFN.wrap(model, path)
    ffn.add_patches(*_random_patches(ffn, 3))
    want = _logits(model, inputs)
    model(**inputs)  # grad enabled: the FFN input carries the autograd graph
    assert ffn._captured is None
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin, inputs), want)
    # a forward stopped between the two FFN matrices leaves a capture: not copied, not pickled
    ffn.layout.tap(torch.randn(2, 3, ffn.bank.d_in, requires_grad=True))
    assert ffn._captured is not None
    assert copy.deepcopy(ffn)._captured is None
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(_logits(torch.load(buf, weights_only=False), inputs), want)
    assert torch.equal(_logits(model, inputs), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_follows_dtype_and_device_of_module(dtype: torch.dtype) -> None:
    model = TINY["llama"][0]()
    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
    ffn.add_patches(*_random_patches(ffn, 4))
    model.to(dtype)
    assert ffn.bank.dtype == dtype and ffn.bank.keys.dtype == dtype
    ffn.add_patches(*_random_patches(ffn, 2, dtype=dtype))
    out = _logits(model, model_inputs("llama"))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_patch_activations_and_training_patches_gradients() -> None:
    model = TINY["gpt2"][0]()
    ffn = PatchedFFN.wrap(model, "transformer.h.-1.mlp")
    ffn.add_patches(*_random_patches(ffn, 3, active_bias=1.0))
    x = torch.randn(2, 5, 64)
    acts = ffn.patch_activations(x)
    assert acts.shape == (2, 5, 3)
    assert (acts[..., 1] == 0).all() and (acts[..., 0] > 0).any()
    k = torch.randn(2, 64, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    v = torch.randn(2, 64, requires_grad=True)
    with ffn.training_patches(k, b, v):
        y = ffn(x)
    # gradient equals the analytic one of relu(x k + b) v
    y.sum().backward()
    x2 = x.reshape(-1, 64)
    pre = x2 @ k.detach().t() + b.detach()
    mask = (pre > 0).float()
    g = torch.ones(10, 64)
    d_pre = (g @ v.detach().t()) * mask
    torch.testing.assert_close(k.grad, (d_pre.t() @ x2).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.grad, (activation_reference(pre, 0).t() @ g).float(), atol=1e-4, rtol=1e-4)
    assert ffn._trainable is None



@pytest.mark.parametrize("name", list(TINY))
def test_model_state_dict_keeps_the_base_names(name: str) -> None:
    """Wrapping renames nothing: same keys, same order, the same tensors as the base model."""
    build, path, _ = TINY[name]
    model = build()
    before = model.state_dict()
    ffn = PatchedFFN.wrap(model, path)
    ffn.add_patches(*_random_patches(ffn, 3))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)


@pytest.mark.parametrize("name", list(TINY))
def test_base_checkpoint_loads_strictly_into_a_patched_model(name: str) -> None:
    build, path, _ = TINY[name]
    torch.manual_seed(0)
    source = build()
    want = _logits(source, model_inputs(name))
    torch.manual_seed(1)
    target = build()  # other random weights
    ffn = PatchedFFN.wrap(target, path)
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(_logits(target, model_inputs(name)), want)
    # A state dict that names the wrapper (``...ffn.<name>``) still loads.
    at = next(n for n, m in target.named_modules() if m is ffn)  # split layouts: the down matrix
    raw = {k.replace(f"{at}.", f"{at}.ffn.", 1) if k.startswith(at + ".") else k: v
           for k, v in source.state_dict().items()}
    assert any(k.startswith(f"{at}.ffn.") for k in raw)
    target.load_state_dict(raw, strict=True)
    # A key the FFN does not have is still reported.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        target.load_state_dict({**source.state_dict(), f"{at}.nonsense": torch.zeros(1)})


@pytest.mark.parametrize("name", list(TINY))
def test_load_state_dict_reports_the_base_names(name: str) -> None:
    """Missing, unexpected and mismatched keys are named as ``state_dict()`` names them (no ``ffn.``)."""
    build, path, _ = TINY[name]
    model = build()
    ffn = PatchedFFN.wrap(model, path)
    at = next(n for n, m in model.named_modules() if m is ffn)
    sd = model.state_dict()
    key = next(k for k in sd if k.startswith(at + "."))
    partial = {k: v for k, v in sd.items() if k != key}
    result = model.load_state_dict({**partial, f"{at}.nonsense": torch.zeros(1)}, strict=False)
    assert result.missing_keys == [key] and result.unexpected_keys == [f"{at}.nonsense"]
    with pytest.raises(RuntimeError, match=f'Missing key\\(s\\) in state_dict: "{key}"'):
        model.load_state_dict(partial)
    with pytest.raises(RuntimeError) as e:
        model.load_state_dict({**sd, key: torch.zeros(3)})
    assert f"size mismatch for {key}:" in str(e.value) and ".ffn." not in str(e.value)
    model.load_state_dict(sd)  # and the full state dict still loads strictly


def test_save_pretrained_of_a_patched_model_loads_in_plain_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    build, path, _ = TINY["llama"]
    model = build()
    inputs = model_inputs("llama")
    want = _logits(model, inputs)
    ffn = PatchedFFN.wrap(model, path)
    ffn.add_patches(*_random_patches(ffn, 4))
    assert not torch.equal(_logits(model, inputs), want)
    model.save_pretrained(tmp_path / "m")
    ffn.save(tmp_path / "patches.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_logits(plain, inputs), want)  # the base model, bit for bit
    patched_out = _logits(model, inputs)
    PatchedFFN.wrap(plain, path).load(tmp_path / "patches.safetensors")
    assert torch.equal(_logits(plain, inputs), patched_out)


@requires_triton
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 64), (torch.float32, 16)])
def test_fused_kernel_dispatch_bound_by_dtype(monkeypatch, dtype: torch.dtype, bound: int) -> None:
    """The one-launch kernel takes up to 64 tokens in 16-bit dtypes (measured win of the split
    schedule over cuBLAS + patches) and up to 16 in fp32 (its tiles spill; not measured beyond);
    above, the base FFN runs unfused. ``FASTPATCH_FUSED_FFN_MAX_TOKENS`` overrides both."""
    from fastpatch.kernels import ops as PF  # PatchedFFN launches the kernel through this operator

    class GatedMLP(nn.Module):  # the Llama layout: gate_proj / up_proj / down_proj / act_fn
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 24, bias=False), nn.Linear(8, 24, bias=False)
            self.down_proj, self.act_fn = nn.Linear(24, 8, bias=False), nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    holder = nn.Module()
    holder.mlp = GatedMLP().to(dtype)
    ffn = PatchedFFN.wrap(holder, "mlp", backend="triton")
    ffn.add_patches(torch.randn(3, 8, dtype=dtype), torch.zeros(3, dtype=dtype), torch.randn(3, 8, dtype=dtype))
    calls: list[int] = []
    real = PF.fused_ffn_launch
    monkeypatch.setattr(PF, "fused_ffn_launch", lambda x2, *a, **k: calls.append(x2.shape[0]) or real(x2, *a, **k))
    with torch.no_grad():
        for M in (1, bound, bound + 1):
            ffn(torch.randn(M, 8, dtype=dtype))
        monkeypatch.setenv("FASTPATCH_FUSED_FFN_MAX_TOKENS", str(bound + 1))
        ffn(torch.randn(bound + 1, 8, dtype=dtype))
    assert calls == [1, bound, bound + 1]
