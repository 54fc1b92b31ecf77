"""The vLLM integration's pure-PyTorch parts, without vLLM: tensor-parallel sharding of patch
neurons, patch-file checks against a served MLP, the two-phase patch state, the custom op.

The engine itself is tested in ``tests/vllm/`` (its own venv, ``make test-vllm``).
"""

from __future__ import annotations

import uuid

import pytest
import torch

from fastpatch import PatchedFFN, PatchFileError
from fastpatch.integrations.vllm.ops import new_slot
from fastpatch.integrations.vllm.patchfile import served_ffn
from fastpatch.integrations.vllm.sharding import PatchSet, patch_partial, shard_patches, shard_range
from fastpatch.integrations.vllm.state import PatchState

from .tiny_models import tiny_llama


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_range_is_a_balanced_partition(n: int, world: int) -> None:
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(4, 0, 0)


def _patched_llama(n_patches: int, seed: int = 0):
    """A tiny Llama with a PatchedFFN on its last MLP and ``n_patches`` patches that fire."""
    torch.manual_seed(seed)
    model = tiny_llama()
    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
    d = ffn.bank.d_in
    ffn.add_patches(torch.randn(n_patches, d) * 0.3, torch.rand(n_patches) * 0.5, torch.randn(n_patches, d))
    return model, ffn


def _served(ffn: PatchedFFN, dtype: torch.dtype = torch.float32):
    mlp = ffn.ffn
    w = lambda m: m.weight.detach().to(dtype)  # noqa: E731
    return served_ffn(ffn.module_path, dtype, w(mlp.gate_proj), w(mlp.up_proj), w(mlp.down_proj), ffn.bank.d_in,
                      ffn.bank.d_out)


def _rank_partial_mlp(mlp: torch.nn.Module, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What vLLM's rank ``rank`` computes for the MLP before the all-reduce: gate/up column slice,
    down row slice (Megatron split of the intermediate neurons)."""
    s, e = shard_range(mlp.up_proj.weight.shape[0], rank, world)
    g = x @ mlp.gate_proj.weight[s:e].t()
    u = x @ mlp.up_proj.weight[s:e].t()
    return (torch.nn.functional.silu(g) * u) @ mlp.down_proj.weight[:, s:e].t()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_patches", [1, 5, 16])
def test_rank_partials_sum_to_the_patched_ffn(tmp_path, world: int, n_patches: int) -> None:
    """Each rank adds its patch slice to its partial down projection; the single all-reduce (a
    sum here) gives exactly what PatchedFFN computes on one device."""
    model, ffn = _patched_llama(n_patches)
    path = tmp_path / "p.safetensors"
    ffn.save(path)
    x = torch.randn(11, ffn.bank.d_in)
    with torch.no_grad():
        want = ffn(x)
        total = torch.zeros_like(want)
        for rank in range(world):
            slot = new_slot()
            state = PatchState({ffn.module_path: _served(ffn)}, {ffn.module_path: slot}, rank, world, "cpu")
            state.stage("t", [path])
            state.commit("t")
            local = slot.current
            assert local.total == n_patches and local.local == len(range(*shard_range(n_patches, rank, world)))
            total += patch_partial(x, _rank_partial_mlp(ffn.ffn, x, rank, world), local)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    # the patches changed the output: this is not the base MLP's sum
    with ffn.patches_disabled(), torch.no_grad():
        assert not torch.allclose(ffn(x), want, atol=1e-3)


def test_shard_patches_splits_bytes_evenly() -> None:
    k, b, v = torch.randn(10, 8), torch.randn(10), torch.randn(10, 6)
    parts = [shard_patches(k, b, v, r, 4) for r in range(4)]
    assert [p[0].shape[0] for p in parts] == [3, 3, 2, 2]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), k)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), v)


def test_no_patches_is_the_base_bit_for_bit() -> None:
    base = torch.randn(3, 5)
    empty = PatchSet(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5), 0, 0, "m")
    out = patch_partial(torch.randn(3, 4), base, empty)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


def test_served_fingerprint_equals_patched_ffn_fingerprint() -> None:
    """The engine hashes the checkpoint's gate/up/down tensors the way PatchedFFN.save does."""
    _, ffn = _patched_llama(2)
    assert _served(ffn).fingerprint == ffn.fingerprint()
    assert _served(ffn, torch.bfloat16).fingerprint == ffn.fingerprint()  # dtype-independent


def _state(ffn: PatchedFFN, served=None, rank: int = 0, world: int = 1) -> PatchState:
    served = served or _served(ffn)
    return PatchState({ffn.module_path: served}, {ffn.module_path: new_slot()}, rank, world, "cpu")


def test_stage_commit_rollback_and_discard(tmp_path) -> None:
    _, ffn = _patched_llama(3)
    a = tmp_path / "a.safetensors"
    ffn.save(a)
    ffn.add_patches(torch.randn(2, 64), torch.zeros(2), torch.randn(2, 64))
    b = tmp_path / "b.safetensors"
    ffn.save(b)
    st = _state(ffn)
    mp = ffn.module_path
    assert st.live()[mp].total == 0
    staged = st.stage("1", [a])
    assert staged["layers"][mp]["total"] == 3 and st.live()[mp].total == 0  # staged, not served
    st.commit("1")
    assert st.live()[mp].total == 3
    st.stage("2", [b])
    st.discard("2")
    with pytest.raises(KeyError, match="no staged"):
        st.commit("2")
    assert st.live()[mp].total == 3
    st.stage("3", [b])
    st.commit("3")
    assert st.live()[mp].total == 5
    st.stage("4", [], clear=True)
    st.commit("4")
    assert st.live()[mp].total == 0
    assert [st.rollback()["layers"][mp]["total"] for _ in range(3)] == [5, 3, 0]
    with pytest.raises(RuntimeError, match="roll back"):
        st.rollback()


def test_bad_files_are_refused_by_name_and_change_nothing(tmp_path) -> None:
    _, ffn = _patched_llama(3)
    good = tmp_path / "good.safetensors"
    ffn.save(good)
    st = _state(ffn)
    st.stage("g", [good])
    st.commit("g")
    live = st.live()

    _, other = _patched_llama(3, seed=1)  # same shapes, other weights
    foreign = tmp_path / "foreign.safetensors"
    other.save(foreign)
    with pytest.raises(PatchFileError, match="different FFN weights"):
        st.stage("x", [foreign])

    model2 = tiny_llama()
    first = PatchedFFN.wrap(model2, "model.layers.0.mlp")
    first.add_patches(torch.randn(1, 64), torch.zeros(1), torch.randn(1, 64))
    layer0 = tmp_path / "layer0.safetensors"
    first.save(layer0)
    with pytest.raises(PatchFileError, match=r"model.layers.0.mlp.*this engine patches \['model.layers.1.mlp'\]"):
        st.stage("x", [layer0])

    with pytest.raises(PatchFileError, match="both patch"):
        st.stage("x", [good, good])

    not_patches = tmp_path / "nope.safetensors"
    not_patches.write_bytes(b"not a safetensors file")
    with pytest.raises(PatchFileError, match="not a readable safetensors"):
        st.stage("x", [not_patches])

    unknown = served_ffn(ffn.module_path, torch.float32, None, None, None, 64, 64)
    with pytest.raises(PatchFileError, match="cannot check"):
        _state(ffn, unknown).stage("x", [good])

    wide = served_ffn(ffn.module_path, torch.float32, torch.zeros(4, 32), torch.zeros(4, 32), torch.zeros(32, 4), 32, 32)
    with pytest.raises(PatchFileError, match="d_in=64, d_out=64"):
        _state(ffn, wide).stage("x", [good])
    assert st.live() == live


def test_patches_made_in_fp32_serve_in_bf16(tmp_path) -> None:
    _, ffn = _patched_llama(2)
    f = tmp_path / "p.safetensors"
    ffn.save(f)
    st = _state(ffn, _served(ffn, torch.bfloat16))
    st.stage("b", [f])
    st.commit("b")
    assert st.live()[ffn.module_path].keys.dtype == torch.bfloat16


def test_custom_op_follows_slot_swaps_under_torch_compile(tmp_path) -> None:
    """Compiled once, the op reads whatever set the slot holds at call time: a swap that changes
    the number of patches needs no recompilation and is never baked into the graph."""
    _, ffn = _patched_llama(4)
    f = tmp_path / "p.safetensors"
    ffn.save(f)
    st = _state(ffn)
    slot = st.slots[ffn.module_path].ident

    def layer(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.ops.fastpatch.vllm_patch_add(x, base * 1.0, slot) + 0.0

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    x, base = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.equal(compiled(x, base), base)  # empty set
    tok = uuid.uuid4().hex
    st.stage(tok, [f])
    st.commit(tok)
    with torch.no_grad():
        bank = ffn.bank  # the bank the file came from
        ref = base + torch.relu(x @ bank.keys.t() + bank.biases) @ bank.values
    torch.testing.assert_close(compiled(x, base), ref)
    st.rollback()
    assert torch.equal(compiled(x, base), base)


def test_checkpoint_ffn_reads_the_fingerprint_from_disk(tmp_path) -> None:
    """``llm_kwargs`` checks start files against the checkpoint before an engine starts."""
    from fastpatch.integrations.vllm.patchfile import checkpoint_ffn
    from fastpatch.integrations.vllm.plugin import llm_kwargs

    torch.manual_seed(0)
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
    ffn.add_patches(torch.randn(2, 64), torch.zeros(2), torch.randn(2, 64))
    ffn.save(tmp_path / "p.safetensors")
    assert checkpoint_ffn(tmp_path / "m", "model.layers.1.mlp").fingerprint == ffn.fingerprint()
    kw = llm_kwargs(tmp_path / "m", patches=tmp_path / "p.safetensors")
    assert kw["hf_overrides"]["architectures"] == ["FastpatchLlamaForCausalLM"]
    assert kw["hf_overrides"]["fastpatch_patches"] == [str((tmp_path / "p.safetensors").resolve())]
    with pytest.raises(PatchFileError, match="no safetensors weights"):
        checkpoint_ffn(tmp_path / "m", "model.layers.7.mlp")
    _, other = _patched_llama(1, seed=3)
    other.save(tmp_path / "o.safetensors")
    with pytest.raises(PatchFileError, match="different FFN weights"):
        llm_kwargs(tmp_path / "m", patches=[tmp_path / "o.safetensors"])


def test_llm_kwargs_refuses_other_architectures(tmp_path) -> None:
    from fastpatch.integrations.vllm.plugin import llm_kwargs

    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="serves"):
        llm_kwargs(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llm_kwargs(tmp_path / "nowhere")


class _Worker:
    """A rank as vLLM's worker presents it to the extension: ``model_runner.get_model()``."""

    def __init__(self, state: PatchState) -> None:
        from types import SimpleNamespace

        model = SimpleNamespace(fastpatch=state)
        self.model_runner = SimpleNamespace(get_model=lambda: model)


class _TwoRanks:
    """``collective_rpc`` over in-process ranks (the real extension methods and patch states;
    only vLLM's transport is left out), to fail one rank and not the other."""

    def __init__(self, states: list[PatchState]) -> None:
        from fastpatch.integrations.vllm.hot_update import FastpatchWorkerExtension

        cls = type("Worker", (_Worker, FastpatchWorkerExtension), {})
        self.workers = [cls(s) for s in states]

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return [getattr(w, method)(*args) for w in self.workers]


def test_one_rank_failing_leaves_every_rank_unchanged(tmp_path) -> None:
    from fastpatch.integrations.vllm import PatchUpdater

    _, ffn = _patched_llama(4)
    good = tmp_path / "good.safetensors"
    ffn.save(good)
    _, other = _patched_llama(1, seed=5)
    ok = PatchState({ffn.module_path: _served(ffn)}, {ffn.module_path: new_slot()}, 0, 2, "cpu")
    odd = PatchState({ffn.module_path: _served(other)}, {ffn.module_path: new_slot()}, 1, 2, "cpu")
    upd = PatchUpdater(_TwoRanks([ok, odd]))
    with pytest.raises(PatchFileError, match="different FFN weights"):
        upd.load(good)
    for st in (ok, odd):
        assert st.live()[ffn.module_path].total == 0 and not st._staged and not st.history
    fine = PatchState({ffn.module_path: _served(ffn)}, {ffn.module_path: new_slot()}, 1, 2, "cpu")
    upd = PatchUpdater(_TwoRanks([ok, fine]))
    ranks = upd.load(good)
    assert [r["layers"][ffn.module_path]["local"] for r in ranks] == [2, 2]
    assert [r["layers"][ffn.module_path]["total"] for r in upd.rollback()] == [0, 0]
    with pytest.raises(RuntimeError, match="roll back"):
        upd.rollback()
