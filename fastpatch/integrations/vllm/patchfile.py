"""Check that a fastpatch patch file fits the model a vLLM engine serves, and build a rank's
``PatchSet`` from it (pure PyTorch; no vLLM needed).

vLLM stores a Llama MLP as one merged ``gate_up_proj`` (and, with tensor parallelism, only a
slice of it per rank), so the served parameters cannot be hashed the way ``PatchedFFN`` hashes
the Hugging Face modules. Instead the engine records the checkpoint tensors of each patchable
layer (``model.layers.N.mlp.{gate,up,down}_proj.weight``, full and unsharded: every rank reads
them) while vLLM loads them, and fingerprints them with fastpatch's own ``weights_fingerprint``
on the same ``FFNLayout.base_tensors()`` that ``PatchedFFN.save`` used. A file made on the
same checkpoint therefore carries the same fingerprint, whatever the tensor-parallel size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...bank import PatchBank, PatchFileError, _SAMPLE_ATOL, _SAMPLE_RTOL, weights_fingerprint, weights_sample
from ...ffn import detect_layout
from ...kernels.reference import ACT_CODES
from .sharding import PatchSet, shard_patches

__all__ = ["ServedFFN", "served_ffn", "checkpoint_ffn", "layer_path", "read_patch_file", "build_patch_set"]


def layer_path(index: int) -> str:
    """The module path fastpatch saves for the MLP of decoder layer ``index`` (Llama family)."""
    return f"model.layers.{index}.mlp"


@dataclass(frozen=True)
class ServedFFN:
    """What identifies one served MLP: its path, sizes, dtype and checkpoint fingerprint.

    ``sample`` is ``weights_sample`` of the same tensors (JSON), used when the file was made in
    another dtype (e.g. patches trained in fp32, served in bf16), as ``PatchedFFN.load`` does.
    """

    module_path: str
    d_in: int
    d_out: int
    dtype: torch.dtype
    fingerprint: str | None
    sample: str | None


def served_ffn(
    module_path: str, dtype: torch.dtype, gate: torch.Tensor | None, up: torch.Tensor | None,
    down: torch.Tensor | None, d_in: int, d_out: int,
) -> ServedFFN:
    """Identity of a served Llama-family MLP from its checkpoint tensors (HF layout: gate/up
    ``(F, d_in)``, down ``(d_out, F)``). Missing tensors (a checkpoint whose names vLLM maps
    differently) leave the fingerprint unknown; files for that layer are then refused."""
    if gate is None or up is None or down is None:
        return ServedFFN(module_path, d_in, d_out, dtype, None, None)
    shim = nn.Module()
    for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        lin = nn.Linear(1, 1, bias=False, device="meta")
        lin.weight = nn.Parameter(w.detach(), requires_grad=False)
        setattr(shim, name, lin)
    shim.act_fn = nn.SiLU()
    tensors = detect_layout(shim).base_tensors()  # the order and views PatchedFFN hashes
    return ServedFFN(module_path, d_in, d_out, dtype, weights_fingerprint(tensors), weights_sample(tensors))


def checkpoint_ffn(model_dir: str | os.PathLike, module_path: str) -> ServedFFN:
    """Identity of the MLP at ``module_path`` read from a Hugging Face directory's safetensors
    (only its three tensors are read): what the engine will compute once it has loaded them, so
    start files can be checked before an engine is started.

    Raises:
        PatchFileError: the directory has no such tensors in safetensors files.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    names = {p: f"{module_path}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {p: model_dir / weight_map[n] for p, n in names.items() if n in weight_map}
    else:
        files = {p: model_dir / "model.safetensors" for p in names}
    got: dict[str, torch.Tensor] = {}
    for p, f in files.items():
        if f.is_file():
            with safe_open(str(f), framework="pt") as h:
                if names[p] in h.keys():
                    got[p] = h.get_tensor(names[p])
    if len(got) != 3:
        raise PatchFileError(f"{model_dir} has no safetensors weights {sorted(set(names.values()))} to check patches against")
    d_in, d_out = got["up_proj"].shape[1], got["down_proj"].shape[0]
    # The checkpoint's own dtype: a file made in it must match the fingerprint exactly; one made in
    # another dtype is compared by its weights sample, as PatchedFFN.load does.
    dtype = got["up_proj"].dtype
    return served_ffn(module_path, dtype, got["gate_proj"], got["up_proj"], got["down_proj"], d_in, d_out)


def _samples_match(file_sample: str, served_sample: str) -> bool:
    """Same shapes and, up to float16/bfloat16 rounding, the same sampled values (the tolerance
    of ``fastpatch.bank.weights_match_sample``)."""
    try:
        a, b = json.loads(file_sample), json.loads(served_sample)
        if len(a) != len(b):
            return False
        for (sa, va), (sb, vb) in zip(a, b):
            if list(sa) != list(sb) or len(va) != len(vb):
                return False
            ta, tb = torch.tensor(va, dtype=torch.float64), torch.tensor(vb, dtype=torch.float64)
            if not torch.allclose(tb, ta, rtol=_SAMPLE_RTOL, atol=_SAMPLE_ATOL):
                return False
    except (ValueError, TypeError):
        return False
    return True


def read_patch_file(
    path: str | os.PathLike, served: dict[str, ServedFFN]
) -> tuple[dict[str, torch.Tensor], dict[str, str], ServedFFN]:
    """Read a patch file (``PatchedFFN.save`` / ``Editor.save``'s ``patches.safetensors``) and
    check that it fits a served MLP; return (tensors, metadata, that MLP).

    Raises:
        PatchFileError: naming the problem (not a patch file, a layer the engine does not patch,
            other sizes, another family or activation, other weights, NaN/inf).
    """
    name = Path(path).name
    tensors, meta = PatchBank.read_file(path)
    mp = meta.get("module_path", "")
    if mp not in served:
        raise PatchFileError(
            f"{name} holds patches for module {mp!r}; this engine patches {sorted(served)} "
            f"(serve with hf_overrides={{'fastpatch_layers': [...]}} to patch other layers)"
        )
    ffn = served[mp]
    d_in, d_out = int(meta["d_in"]), int(meta["d_out"])
    if (d_in, d_out) != (ffn.d_in, ffn.d_out):
        raise PatchFileError(
            f"{name} is for an FFN of d_in={d_in}, d_out={d_out}; the served {mp} has "
            f"d_in={ffn.d_in}, d_out={ffn.d_out}"
        )
    family = meta.get("family", "llama")
    if family != "llama":
        raise PatchFileError(f"{name} was made on a {family!r}-family FFN; the vLLM plugin serves Llama-family (gated) MLPs")
    act_name = meta.get("patch_act", "relu")
    if act_name not in ACT_CODES:
        raise PatchFileError(f"{name} has an unknown patch activation {act_name!r}")
    if ffn.fingerprint is None:
        raise PatchFileError(
            f"{name}: the engine did not see the checkpoint tensors of {mp} under their Hugging Face "
            f"names while loading, so it cannot check that the patches were made on these weights"
        )
    cross_dtype = meta.get("dtype") != str(ffn.dtype).replace("torch.", "")
    same = meta.get("fingerprint") == ffn.fingerprint or (
        cross_dtype and "weights_sample" in meta and ffn.sample is not None
        and _samples_match(meta["weights_sample"], ffn.sample)
    )
    if not same:
        raise PatchFileError(
            f"{name} was made for different FFN weights (fingerprint {meta.get('fingerprint')} != "
            f"{ffn.fingerprint} of the served {mp}): another model or checkpoint"
        )
    for key in ("keys", "biases", "values"):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise PatchFileError(f"{name}: {key} contain NaN or inf")
    return tensors, meta, ffn


def build_patch_set(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], ffn: ServedFFN, rank: int, world_size: int,
    device: torch.device | str, source: str = "",
) -> PatchSet:
    """This rank's ``PatchSet`` of validated file content, in the served dtype, on ``device``."""
    k, b, v = shard_patches(tensors["keys"], tensors["biases"], tensors["values"], rank, world_size)
    to = dict(device=device, dtype=ffn.dtype)
    info = {key: meta[key] for key in ("fingerprint", "dtype", "activation", "records") if key in meta}
    return PatchSet(
        k.to(**to), b.to(**to), v.to(**to), ACT_CODES[meta.get("patch_act", "relu")],
        int(tensors["keys"].shape[0]), ffn.module_path, source, info,
    )
