"""The layout finder of :mod:`fastpatch.ffn` on its own: activation codes, every family's
detection (and what is *not* detected), the weight views and ``resolve_module``'s paths and
messages. Small modules built here (no model forward), so these run in about a second."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import T5Config
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5LayerFF
from transformers.pytorch_utils import Conv1D

from fastpatch.ffn import (
    FFNLayout,
    UnknownLayoutError,
    activation_code,
    detect_layout,
    resolve_module,
)
from fastpatch.kernels.reference import ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU

from .tiny_models import TINY


def _named(name: str, base: type = nn.Module, **attrs: object) -> nn.Module:
    """An instance of a fresh class called ``name`` (deriving from ``base``), with ``attrs`` set."""
    obj = type(name, (base,), {})()
    for key, value in attrs.items():
        setattr(obj, key, value)
    return obj


# ---------------------------------------------------------------------------------------------
# activation_code
# ---------------------------------------------------------------------------------------------


class _SubReLU(nn.ReLU):
    """A ReLU under another class name: recognised by its type."""


class _SubSiLU(nn.SiLU):
    pass


@pytest.mark.parametrize("act, code", [
    (None, None),
    (nn.ReLU(), ACT_RELU),
    (_SubReLU(), ACT_RELU),
    (_named("ReLU"), ACT_RELU),  # recognised by its name only
    (nn.SiLU(), ACT_SILU),
    (_SubSiLU(), ACT_SILU),
    (_named("SiLU"), ACT_SILU),
    (_named("SiLUActivation"), ACT_SILU),
    (nn.GELU(), ACT_GELU),
    (nn.GELU(approximate="tanh"), ACT_GELU_TANH),
    (ACT2FN["gelu"], ACT_GELU),  # transformers' GELUActivation wrapping nn.functional.gelu
    (_named("GELUActivation", act=nn.functional.gelu), ACT_GELU),
    (_named("GELUActivation", act=torch.tanh), None),  # a GELUActivation of something else
    (_named("GELUActivation"), None),  # no act attribute at all
    (ACT2FN["gelu_new"], ACT_GELU_TANH),
    (_named("NewGELUActivation"), ACT_GELU_TANH),
    (_named("GELUTanh"), ACT_GELU_TANH),
    (_named("PytorchGELUTanh"), ACT_GELU_TANH),
    (_named("FastGELUActivation"), ACT_GELU_TANH),
    (nn.Tanh(), None),
    (_named("Relu"), None),  # names match exactly
    (torch.relu, None),  # a plain function has no kernel twin
], ids=lambda v: type(v).__name__ if not isinstance(v, (int, type(None))) else repr(v))
def test_activation_code(act: object, code: int | None) -> None:
    assert activation_code(act) == code


# ---------------------------------------------------------------------------------------------
# detect_layout: every family, and the near misses
# ---------------------------------------------------------------------------------------------


def _lin(i: int, o: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(i, o, bias=bias)


def _module(**children: object) -> nn.Module:
    m = nn.Module()
    for key, value in children.items():
        setattr(m, key, value)
    return m


def _llama_like(**over: object) -> nn.Module:
    parts = dict(gate_proj=_lin(8, 12, False), up_proj=_lin(8, 12, False), down_proj=_lin(12, 6, False),
                 act_fn=nn.SiLU())
    parts.update(over)
    return _module(**{k: v for k, v in parts.items() if v is not None})


def test_gated_llama() -> None:
    m = _llama_like()
    lay = detect_layout(m)
    assert (lay.kind, lay.family) == ("gated", "llama")
    assert (lay.up, lay.down, lay.gate, lay.act, lay.tap) == (m.up_proj, m.down_proj, m.gate_proj, m.act_fn, None)
    assert (lay.d_in, lay.d_out, lay.intermediate, lay.act_code) == (8, 6, 12, ACT_SILU)
    assert lay.w_up.data_ptr() == m.up_proj.weight.data_ptr() and lay.w_up.shape == (12, 8)  # a view
    assert torch.equal(lay.w_gate, m.gate_proj.weight) and torch.equal(lay.w_down, m.down_proj.weight.t())
    assert (lay.b_up, lay.b_gate, lay.b_down) == (None, None, None)
    w_up, w_down, code, w_gate, b_up, b_gate, b_down = lay.kernel_args()
    assert w_up is not None and torch.equal(w_up, lay.w_up) and torch.equal(w_down, lay.w_down)
    assert torch.equal(w_gate, lay.w_gate) and (code, b_up, b_gate, b_down) == (ACT_SILU, None, None, None)
    base = lay.base_tensors()
    assert len(base) == 3 and all(torch.equal(a, b) for a, b in zip(base, [lay.w_up, lay.w_down, lay.w_gate]))


@pytest.mark.parametrize("missing", ["gate_proj", "up_proj", "down_proj", "act_fn"])
def test_gated_llama_needs_every_part(missing: str) -> None:
    with pytest.raises(UnknownLayoutError):
        detect_layout(_llama_like(**{missing: None}))


def test_gated_llama_parts_must_be_modules() -> None:
    with pytest.raises(UnknownLayoutError):
        detect_layout(_llama_like(gate_proj=torch.zeros(12, 8)))


def test_gpt2_conv1d_views_are_transposed() -> None:
    c_fc, c_proj = Conv1D(12, 8), Conv1D(6, 12)  # Conv1D(out, in) stores (in, out)
    nn.init.normal_(c_fc.bias)
    nn.init.normal_(c_proj.bias)
    m = _module(c_fc=c_fc, c_proj=c_proj, act=ACT2FN["gelu_new"])
    lay = detect_layout(m)
    assert (lay.kind, lay.family, lay.gate, lay.tap) == ("dense", "gpt2", None, None)
    assert (lay.d_in, lay.d_out, lay.intermediate, lay.act_code) == (8, 6, 12, ACT_GELU_TANH)
    assert torch.equal(lay.w_up, c_fc.weight.t()) and lay.w_up.data_ptr() == c_fc.weight.data_ptr()
    assert torch.equal(lay.w_down, c_proj.weight) and lay.w_down.shape == (12, 6)
    assert lay.b_up is c_fc.bias and lay.b_down is c_proj.bias and lay.w_gate is None and lay.b_gate is None
    w_up, w_down, code, w_gate, b_up, b_gate, b_down = lay.kernel_args()
    assert torch.equal(w_up, c_fc.weight.t()) and torch.equal(w_down, c_proj.weight)
    assert (code, w_gate, b_gate) == (ACT_GELU_TANH, None, None) and b_up is c_fc.bias and b_down is c_proj.bias
    base = lay.base_tensors()
    assert len(base) == 4 and base[2] is c_fc.bias and base[3] is c_proj.bias
    # the layout reads the module through the view: x W_up^T is the Conv1D's own product
    x = torch.randn(3, 8)
    torch.testing.assert_close(x @ lay.w_up.t() + lay.b_up, c_fc(x))


def test_conv1d_is_recognised_by_name_and_nf() -> None:
    fake = _named("Conv1D")  # the name without Conv1D's ``nf``: not a Conv1D
    fake.weight = nn.Parameter(torch.zeros(8, 12))
    with pytest.raises(UnknownLayoutError):
        detect_layout(_module(c_fc=fake, c_proj=Conv1D(6, 12), act=nn.ReLU()))
    lin = _lin(8, 12)
    lin.nf = 12  # ``nf`` on a Linear: still not a Conv1D
    with pytest.raises(UnknownLayoutError):
        detect_layout(_module(c_fc=lin, c_proj=Conv1D(6, 12), act=nn.ReLU()))
    with pytest.raises(UnknownLayoutError):  # GPT-2 without its activation
        detect_layout(_module(c_fc=Conv1D(12, 8), c_proj=Conv1D(6, 12)))
    with pytest.raises(UnknownLayoutError):
        detect_layout(_module(c_fc=Conv1D(12, 8), c_proj=_lin(12, 6), act=nn.ReLU()))


def test_t5_gated_dense_and_layer_ff() -> None:
    gated = T5LayerFF(T5Config(d_model=8, d_ff=12, feed_forward_proj="gated-gelu"))
    lay = detect_layout(gated)  # the T5LayerFF: pointed at its DenseReluDense
    drd = gated.DenseReluDense
    assert (lay.kind, lay.family) == ("gated", "t5")
    assert (lay.up, lay.gate, lay.down, lay.act) == (drd.wi_1, drd.wi_0, drd.wo, drd.act)
    assert lay.act_code == ACT_GELU_TANH  # "gated-gelu" is gelu_new
    dense = T5LayerFF(T5Config(d_model=8, d_ff=12)).DenseReluDense
    lay = detect_layout(dense)
    assert (lay.kind, lay.family, lay.up, lay.down, lay.gate) == ("dense", "t5", dense.wi, dense.wo, None)
    assert lay.act_code == ACT_RELU and (lay.d_in, lay.d_out, lay.intermediate) == (8, 8, 12)


@pytest.mark.parametrize("children", [
    dict(wi_0=_lin(8, 12), wi_1=_lin(8, 12), wo=_lin(12, 8)),  # no act
    dict(wi_0=_lin(8, 12), wi_1=Conv1D(12, 8), wo=_lin(12, 8), act=nn.ReLU()),  # not all Linear
    dict(wi=_lin(8, 12), wo=_lin(12, 8)),  # no act
    dict(wi=_lin(8, 12), wo=Conv1D(8, 12), act=nn.ReLU()),
    dict(wi=Conv1D(12, 8), wo=_lin(12, 8), act=nn.ReLU()),
    dict(fc1=_lin(8, 12), fc2=_lin(12, 8)),  # no activation_fn
    dict(fc1=_lin(8, 12), fc2=Conv1D(8, 12), activation_fn=nn.ReLU()),
    dict(fc1=Conv1D(12, 8), fc2=_lin(12, 8), activation_fn=nn.ReLU()),
    dict(intermediate=_module(dense=_lin(8, 12)), output=_module(dense=Conv1D(8, 12))),
    dict(intermediate=_module(dense=Conv1D(12, 8)), output=_module(dense=_lin(12, 8))),
    dict(intermediate=_module(dense=_lin(8, 12))),  # no output
    dict(output=_module(dense=_lin(12, 8))),  # no intermediate
], ids=lambda c: "+".join(c))
def test_near_misses_are_unknown(children: dict) -> None:
    with pytest.raises(UnknownLayoutError) as err:
        detect_layout(_module(**children))
    msg = str(err.value)
    assert msg.startswith("Module is not a known FFN layout. Supported: gated MLP with gate_proj")
    assert "; GPT-2 MLP with c_fc/c_proj (Conv1D); " in msg
    assert msg.endswith(". Pass the path of the FFN module (or of its transformer layer for BERT/BART).")


def test_split_layouts_bert_and_bart() -> None:
    bert = TINY["bert"][0]()
    layer = resolve_module(bert, TINY["bert"][1])[0]
    lay = detect_layout(layer)
    assert (lay.kind, lay.family, lay.gate) == ("split", "bert", None)
    assert (lay.up, lay.down, lay.tap) == (layer.intermediate.dense, layer.output.dense, layer.intermediate)
    assert lay.act is layer.intermediate.intermediate_act_fn and lay.act_code == ACT_GELU
    assert torch.equal(lay.b_down, layer.output.dense.bias) and torch.equal(lay.b_up, layer.intermediate.dense.bias)
    bart = TINY["bart"][0]()
    layer = resolve_module(bart, TINY["bart"][1])[0]
    lay = detect_layout(layer)
    assert (lay.kind, lay.family) == ("split", "bart")
    assert (lay.up, lay.down, lay.tap, lay.act) == (layer.fc1, layer.fc2, layer.fc1, layer.activation_fn)


def test_layout_with_biasless_custom_modules() -> None:
    """A projection module with a weight and no ``bias`` attribute at all: no bias, not an error."""
    up = _module(weight=nn.Parameter(torch.randn(12, 8)))
    lay = FFNLayout("dense", "custom", up, _lin(12, 6), nn.ReLU())
    assert lay.b_up is None and lay.kernel_args()[4] is None and len(lay.base_tensors()) == 3


# ---------------------------------------------------------------------------------------------
# resolve_module
# ---------------------------------------------------------------------------------------------


def _tree() -> nn.Module:
    return _module(layers=nn.ModuleList([_lin(2, 2), _lin(2, 2), nn.Sequential(_lin(2, 3), nn.ReLU())]),
                   named=nn.ModuleDict({"0": _lin(2, 4)}), scale=nn.Parameter(torch.ones(1)))


def test_resolve_module_paths() -> None:
    m = _tree()
    assert resolve_module(m, "layers") == (m.layers, "layers", "layers")
    assert resolve_module(m, "layers.0") == (m.layers[0], "layers.0", "0")
    assert resolve_module(m, "layers.-1") == (m.layers[2], "layers.2", "2")
    assert resolve_module(m, "layers.-3") == (m.layers[0], "layers.0", "0")  # -len is the first
    assert resolve_module(m, "layers.-1.-2") == (m.layers[2][0], "layers.2.0", "0")
    assert resolve_module(m, "layers.2.1") == (m.layers[2][1], "layers.2.1", "1")
    assert resolve_module(m, "named.0") == (m.named["0"], "named.0", "0")  # a digit key of a ModuleDict
    model = TINY["llama"][0]()
    assert resolve_module(model, "model.layers.-1.mlp")[1:] == ("model.layers.1.mlp", "mlp")


@pytest.mark.parametrize("path, error, message", [
    ("", ValueError, "module path is empty"),
    ("layers.3", KeyError, "index 3 out of range for layers (length 3)"),
    ("layers.-4", KeyError, "index -4 out of range for layers (length 3)"),
    ("layers.2.2", KeyError, "index 2 out of range for layers.2 (length 2)"),
    ("layers.first", KeyError, "layers.first is not a module of Module"),
    ("layers.X1", KeyError, "layers.X1 is not a module of Module"),  # not an index: an attribute name
    ("scale", KeyError, "scale is not a module of Module"),  # a parameter, not a module
    ("layers.1.weight", KeyError, "layers.1.weight is not a module of Module"),
    ("nope.x", KeyError, "nope is not a module of Module"),
])
def test_resolve_module_errors(path: str, error: type, message: str) -> None:
    with pytest.raises(error) as err:
        resolve_module(_tree(), path)
    assert err.value.args == (message,)


def test_resolve_module_out_of_range_at_the_top() -> None:
    with pytest.raises(KeyError) as err:
        resolve_module(nn.Sequential(_lin(2, 2)), "1")
    assert err.value.args == ("index 1 out of range for model (length 1)",)
    with pytest.raises(KeyError) as err:
        resolve_module(TINY["gpt2"][0](), "transformer.hh")
    assert err.value.args == ("transformer.hh is not a module of GPT2LMHeadModel",)
