"""``PatchedFFN``: a drop-in FFN wrapper that carries T-Patcher patch neurons.

    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
    ffn.add_patches(keys, biases, values, edit_id="fix-42")
    model(**inputs)        # FFN(x) + sum_p relu(x . k_p + b_p) v_p

On CUDA, decode-sized inputs run the original FFN and the patches in one Triton launch
(``kernels/fused_ffn.py``); larger inputs run the original FFN through cuBLAS and the patches
through ``kernels/patch_forward.py``. On the CPU the same function is computed with PyTorch.
With zero patches the wrapped FFN runs untouched, so outputs are bit for bit the original.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .bank import PatchBank, PatchFileError, weights_fingerprint, weights_match_sample, weights_sample
from .ffn import FFNLayout, UnknownLayoutError, detect_layout, resolve_module
from .kernels import ops
from .kernels.dispatch import use_triton
from .kernels.fused_ffn import fused_ffn_max_tokens
from .kernels.reference import ACT_NAMES, ACT_RELU, activation_reference

__all__ = ["PatchedFFN"]

_ACTIVATIONS = ("relu", "host")


def _fused_max_tokens(dtype: torch.dtype) -> int:
    """Most tokens per call for the one-launch kernel in ``dtype`` (``FASTPATCH_FUSED_FFN_MAX_TOKENS``
    overrides it for every dtype)."""
    env = os.environ.get("FASTPATCH_FUSED_FFN_MAX_TOKENS")
    return int(env) if env else fused_ffn_max_tokens(dtype)


class PatchedFFN(nn.Module):
    """An FFN plus a bank of patch neurons: ``FFN(x) + act(x K^T + b) V``.

    Build it with :meth:`wrap`, which swaps it into the model in place of the FFN.

    Args:
        ffn: the module being wrapped: the FFN itself (gated/dense forms), or the second matrix
            (split forms, BERT/BART), whose FFN input is captured from ``layout.tap``.
        layout: the FFN's layout (``ffn.detect_layout``).
        activation: ``"relu"`` (default: exact zeros outside a patch's region, which is both the
            locality guarantee and the sparsity the kernels skip) or ``"host"``, the FFN's own
            activation as in the authors' code (patches are then extra neurons of the FFN).
        module_path: canonical path of the wrapped FFN in its model (saved with the patches).
        capacity: initial patch capacity of the bank.
        backend: ``auto``/``triton``/``torch``; default from ``FASTPATCH_BACKEND``.
    """

    def __init__(
        self,
        ffn: nn.Module,
        layout: FFNLayout,
        activation: str = "relu",
        module_path: str = "",
        capacity: int = 64,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if activation == "host" and layout.act_code is None:
            raise ValueError(
                f"activation='host' needs a host activation with a kernel twin; "
                f"{type(layout.act).__name__} has none (use activation='relu')"
            )
        self.ffn = ffn
        self.layout = layout
        self.activation = activation
        self.patch_act = ACT_RELU if activation == "relu" else int(layout.act_code)  # type: ignore[arg-type]
        self.module_path = module_path
        self.backend = backend
        w = layout.w_up
        self.bank = PatchBank(layout.d_in, layout.d_out, dtype=w.dtype, device=w.device, capacity=capacity)
        self._trainable: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._disabled = False
        self._captured: torch.Tensor | None = None
        self._hook = None
        # Set by wrap(): where to put the original back on unwrap().
        self._owner: tuple[nn.Module, str] | None = None
        if layout.kind == "split":
            assert layout.tap is not None
            self._hook = layout.tap.register_forward_pre_hook(self._capture_input)
        # The wrapped FFN's tensors keep their original names in the model's state dict
        # ("...mlp.up_proj.weight", not "...mlp.ffn.up_proj.weight"): ``model.state_dict()`` and
        # ``save_pretrained`` of a patched model load into plain transformers, and a base
        # checkpoint loads into a patched model. Patches are saved on their own (``save``).
        # Missing/unexpected keys and size mismatches are reported under those names too.
        self._loading: tuple[str, list[str]] | None = None
        self.register_state_dict_post_hook(_hide_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_restore_wrapper_prefix)
        self.register_load_state_dict_post_hook(_report_base_names)

    # ----------------------------------------------------------------- wrapping
    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        path: str,
        activation: str = "relu",
        capacity: int = 64,
        backend: str | None = None,
    ) -> "PatchedFFN":
        """Wrap the FFN at ``path`` of ``model`` in place and return the wrapper.

        ``path`` is dotted with optional negative indices, e.g. ``"model.layers.-1.mlp"``
        (Llama), ``"transformer.h.-1.mlp"`` (GPT-2), ``"decoder.block.-1.layer.-1"`` (T5),
        ``"bert.encoder.layer.-1"`` or ``"model.decoder.layers.-1"`` (BERT/BART layers).
        """
        module, canon, _ = resolve_module(model, path)
        if isinstance(getattr(module, "DenseReluDense", None), nn.Module):  # T5LayerFF
            module, canon = module.DenseReluDense, canon + ".DenseReluDense"
        if isinstance(module, PatchedFFN):
            raise ValueError(f"{canon} is already wrapped by a PatchedFFN")
        try:
            layout = detect_layout(module)
        except UnknownLayoutError:
            # A BERT/BART layer whose down matrix is already wrapped no longer looks like an FFN.
            inner = next((n for n, m in module.named_modules() if isinstance(m, PatchedFFN)), None)
            if inner is not None:
                raise ValueError(f"{canon}.{inner} is already wrapped by a PatchedFFN") from None
            raise
        if layout.kind == "split":
            # Replace the down matrix inside the layer; the layer keeps calling it.
            target = layout.down
            owner, attr = _owner_of(module, target)
            wrapper = cls(target, layout, activation, canon, capacity, backend)
        else:
            owner, attr = _owner_of(model, module, canon)
            wrapper = cls(module, layout, activation, canon, capacity, backend)
        setattr(owner, attr, wrapper)
        wrapper._owner = (owner, attr)
        return wrapper

    def unwrap(self) -> nn.Module:
        """Put the original module back into the model and detach hooks; return it."""
        if self._owner is None:
            raise RuntimeError("this PatchedFFN was not installed by wrap()")
        owner, attr = self._owner
        setattr(owner, attr, self.ffn)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._owner = None
        return self.ffn

    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured = args[0]

    def __getstate__(self) -> dict[str, Any]:
        # A captured FFN input is a per-call activation (possibly with its autograd graph, which
        # deepcopy refuses): it is neither copied nor pickled with the module.
        state = super().__getstate__()
        state["_captured"] = None
        return state

    # -------------------------------------------------------------- patch API
    @property
    def num_patches(self) -> int:
        """Number of patches in the bank."""
        return self.bank.num_patches

    def add_patches(
        self,
        keys: torch.Tensor,
        biases: torch.Tensor,
        values: torch.Tensor,
        edit_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """Add patches (keys (n, d_in), biases (n,), values (n, d_out)); return their ids."""
        return self.bank.add(keys, biases, values, edit_id=edit_id, extra=extra)

    def remove(self, ids: Iterable[int]) -> None:
        """Remove patches by id; every other patch keeps working."""
        self.bank.remove(ids)

    @contextlib.contextmanager
    def training_patches(
        self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor
    ) -> Iterator[None]:
        """Temporarily add differentiable patches (not in the bank) to every forward."""
        if keys.shape[1] != self.bank.d_in or values.shape[1] != self.bank.d_out:
            raise ValueError(
                f"training patches must be (n, {self.bank.d_in}) keys and (n, {self.bank.d_out}) values"
            )
        self._trainable = (keys, biases, values)
        try:
            yield
        finally:
            self._trainable = None

    @contextlib.contextmanager
    def patches_disabled(self) -> Iterator[None]:
        """Run the original FFN alone inside the block (like PEFT's ``disable_adapter()``).

        The bank is kept; training patches (``training_patches``) are ignored too.
        """
        old = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = old

    def fingerprint(self) -> str:
        """Fingerprint of the wrapped FFN's weights (independent of dtype/device)."""
        return weights_fingerprint(self.layout.base_tensors())

    # ---------------------------------------------------------------- forward
    def _ffn_input(self, x: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
        if self.layout.kind != "split":
            return x
        if captured is None:
            raise RuntimeError(
                "PatchedFFN (split layout) was called before its layer's first FFN matrix: "
                "the FFN input was not captured"
            )
        return captured

    def patch_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``act(x K^T + b)`` of every bank patch, shape (..., P)."""
        k, b = self.bank.keys, self.bank.biases
        x2 = x.reshape(-1, x.shape[-1]).to(k.dtype)
        return activation_reference(torch.addmm(b, x2, k.t()), self.patch_act).reshape(*x.shape[:-1], -1)

    def _fused_args(self, x2: torch.Tensor) -> tuple | None:
        """The layout's kernel arguments if this call can take the one-launch kernel, else None
        (the layout's modules are read once per call, here)."""
        lay = self.layout
        if lay.kind == "split" or x2.shape[0] > _fused_max_tokens(x2.dtype):
            return None
        args = lay.kernel_args()  # (w_up, w_down, act_code, ...)
        w_up, act_code = args[0], args[2]
        ok = (
            act_code is not None
            and x2.dtype == w_up.dtype == self.bank.dtype
            and x2.device == w_up.device == self.bank.device
            and not torch.are_deterministic_algorithms_enabled()
            and use_triton(x2, self.backend)
        )
        return args if ok else None

    def _bank_tensors(self, compiling: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bank's keys, biases and values: the live rows in eager mode; the full-capacity
        buffers while ``torch.compile`` traces (their rows past the live patches are exact zeros,
        which add exactly nothing), so the graph depends on the capacity only and adding or
        removing patches between calls does not recompile it."""
        bank = self.bank
        if compiling:
            return bank._keys, bank._biases, bank._values
        return bank.keys, bank.biases, bank.values

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: D401
        """``FFN(x) + patches(x_ffn)``; ``x_ffn`` is ``x`` except in split layouts.

        The patch kernels are called through ``kernels/ops.py``: ``fastpatch::`` operators under
        ``torch.compile`` (so ``fullgraph=True`` traces this method without a graph break), the
        launchers themselves in eager mode.
        """
        bank = self.bank
        # Split layouts: take the input captured by the tap for this call and release it, so the
        # module does not keep the last batch's activations (and their autograd graph) alive.
        captured, self._captured = self._captured, None
        # Under torch.compile the patch count is not read (a guard on it would recompile the
        # graph at every edit): the operator runs on the full-capacity buffers instead.
        compiling = torch.compiler.is_compiling()
        if self._disabled or (not compiling and bank.num_patches == 0 and self._trainable is None):
            return self.ffn(x, *args, **kwargs)
        xin = self._ffn_input(x, captured)
        d = bank.d_in
        x2 = xin.reshape(-1, d)
        keys, biases, values = self._bank_tensors(compiling)
        needs_grad = torch.is_grad_enabled() and (
            xin.requires_grad or self._trainable is not None or keys.requires_grad
        )
        backend = self.backend
        kernel_args = None if (needs_grad or args or kwargs) else self._fused_args(x2)
        if kernel_args is not None:
            # The layout's weights and the bank were validated when they were set; what can change
            # between calls (x's dtype and device, the bank's) is checked in _fused_args.
            out = ops.fused_ffn(x2, *kernel_args, keys, biases, values, self.patch_act)
            return out.reshape(*x.shape[:-1], bank.d_out)
        base = self.ffn(x, *args, **kwargs)
        base2 = base.reshape(-1, bank.d_out)
        xk = x2.to(bank.dtype)
        if needs_grad:
            out2 = base2
            if compiling or bank.num_patches:
                out2 = out2 + ops.patch_delta(xk, keys, biases, values, self.patch_act, backend).to(base.dtype)
            if self._trainable is not None:
                k, b, v = self._trainable
                out2 = out2 + ops.patch_delta(x2.to(k.dtype), k, b, v, self.patch_act, "torch").to(base.dtype)
            return out2.reshape(base.shape)
        strategy = "gemm" if torch.are_deterministic_algorithms_enabled() else "auto"
        out2 = ops.patch_add(xk, keys, biases, values, base2.to(bank.dtype), self.patch_act, backend, strategy)
        if self._trainable is not None:
            k, b, v = self._trainable
            out2 = out2 + ops.patch_delta(x2.to(k.dtype), k, b, v, self.patch_act, "torch").to(out2.dtype)
        return out2.to(base.dtype).reshape(base.shape)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save the patches (safetensors) with what identifies this FFN."""
        self.bank.save(
            path,
            {
                "module_path": self.module_path,
                "fingerprint": self.fingerprint(),
                "weights_sample": weights_sample(self.layout.base_tensors()),
                "activation": self.activation,
                "family": self.layout.family,
                "patch_act": ACT_NAMES[self.patch_act],
            },
        )

    def load(self, path: str | os.PathLike) -> None:
        """Load patches saved by :meth:`save`; refuse files made for another model or layer.

        The bank is replaced only after every check passes.
        """
        tensors, meta = PatchBank.read_file(path)
        if meta.get("module_path") != self.module_path:
            raise PatchFileError(
                f"{Path(path).name} holds patches for module {meta.get('module_path')!r}, "
                f"not {self.module_path!r}"
            )
        if meta.get("activation", "relu") != self.activation:
            raise PatchFileError(
                f"{Path(path).name} holds {meta.get('activation')!r}-activation patches; this "
                f"PatchedFFN uses {self.activation!r}"
            )
        fp = self.fingerprint()
        # The exact fingerprint; across dtypes (files that carry one) the sample of the weights up
        # to float16/bfloat16 rounding: the model served in float16 takes the patches made on it in
        # fp32 or bf16. In the same dtype nothing excuses a difference (a fine-tuned checkpoint).
        cross_dtype = meta.get("dtype") != str(self.bank.dtype).replace("torch.", "")
        same = meta.get("fingerprint") == fp or (
            cross_dtype and "weights_sample" in meta
            and weights_match_sample(meta["weights_sample"], self.layout.base_tensors())
        )
        if not same:
            raise PatchFileError(
                f"{Path(path).name} was made for different FFN weights (fingerprint "
                f"{meta.get('fingerprint')} != {fp}): another model or checkpoint"
            )
        self.bank.load_tensors(tensors, meta)

    def extra_repr(self) -> str:
        return f"path={self.module_path!r}, form={self.layout.kind}, family={self.layout.family}, activation={self.activation}"


_WRAPPED = "ffn"  # attribute of PatchedFFN holding the wrapped module


def _hide_wrapper_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: ``<prefix>ffn.<name>`` -> ``<prefix><name>``, in place, order kept."""
    inner = prefix + _WRAPPED + "."
    if not any(k.startswith(inner) for k in state_dict):
        return
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        state_dict[prefix + k[len(inner):] if k.startswith(inner) else k] = v


def _restore_wrapper_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    """Load pre-hook: route the base FFN's names (``<prefix><name>``) to the wrapped module.

    Keys already under ``<prefix>ffn.`` (a state dict taken with the hook removed) load as they are.
    """
    own = set(module._modules)
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if rest.split(".", 1)[0] not in own:
            state_dict[prefix + _WRAPPED + "." + rest] = state_dict.pop(k)
    module._loading = (prefix, error_msgs)  # for _report_base_names, once the subtree is loaded


def _report_base_names(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: report ``<prefix>ffn.<name>`` keys as ``<prefix><name>``, as state_dict names them.

    Rewrites the missing and unexpected keys and the error messages (size mismatches) in place.
    """
    ctx, module._loading = getattr(module, "_loading", None), None
    if ctx is None:
        return
    prefix, error_msgs = ctx
    inner = prefix + _WRAPPED + "."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(inner):] if k.startswith(inner) else k for k in keys]
    error_msgs[:] = [m.replace(f" {inner}", f" {prefix}") for m in error_msgs]


def _owner_of(root: nn.Module, target: nn.Module, canon: str | None = None) -> tuple[nn.Module, str]:
    """The (parent, attribute) under which ``target`` is registered in ``root``."""
    if canon:
        parts = canon.split(".")
        parent, _, _ = resolve_module(root, ".".join(parts[:-1])) if len(parts) > 1 else (root, "", "")
        return parent, parts[-1]
    for name, child in root.named_children():
        if child is target:
            return root, name
    for mod in root.modules():
        for name, child in mod.named_children():
            if child is target:
                return mod, name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")
