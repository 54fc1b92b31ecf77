"""PatchBank and PatchedFFN persistence: growth, removal, save/load, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from fastpatch import PatchBank, PatchedFFN, PatchFileError
from fastpatch.bank import weights_fingerprint, weights_match_sample, weights_sample

from .tiny_models import TINY, model_inputs


def _p(n: int, d_in: int = 8, d_out: int = 6, dtype=torch.float32):
    return torch.randn(n, d_in, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(n, d_out, dtype=dtype)


def _snapshot(bank: PatchBank):
    return (bank.keys.clone(), bank.biases.clone(), bank.values.clone(), bank.ids, bank.num_patches)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_growth_is_amortised_and_keeps_content() -> None:
    bank = PatchBank(8, 6, capacity=16)
    added, caps = [], set()
    for i in range(40):
        k, b, v = _p(3)
        bank.add(k, b, v, edit_id=f"e{i}")
        added.append((k, b, v))
        caps.add(bank.capacity)
    assert bank.num_patches == 120
    # doubling: 16 -> 32 -> 64 -> 128, never one reallocation per add
    assert caps == {16, 32, 64, 128}
    assert bank.capacity <= 2 * bank.num_patches
    torch.testing.assert_close(bank.keys, torch.cat([a[0] for a in added]))
    torch.testing.assert_close(bank.values, torch.cat([a[2] for a in added]))
    assert bank.ids == list(range(120))


def test_add_writes_in_place_without_reallocating_within_capacity() -> None:
    bank = PatchBank(8, 6, capacity=64)
    bank.add(*_p(1))
    ptr = bank._keys.data_ptr()
    for _ in range(10):
        bank.add(*_p(2))
    assert bank._keys.data_ptr() == ptr


def test_remove_is_a_rollback_of_one_edit() -> None:
    bank = PatchBank(8, 6)
    a = bank.add(*_p(2), edit_id="a")
    k_b, b_b, v_b = _p(3)
    b = bank.add(k_b, b_b, v_b, edit_id="b")
    c = bank.add(*_p(1), edit_id="c")
    assert bank.ids_for_edit("b") == b
    bank.remove(b)
    assert bank.ids == a + c and bank.num_patches == 3
    assert [r.edit_id for r in bank.records()] == ["a", "a", "c"]
    new = bank.add(*_p(1), edit_id="d")
    assert new == [6]  # ids are never reused
    assert not any(torch.equal(bank.keys[i], k_b[j]) for i in range(4) for j in range(3))


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (lambda: _p(2, d_in=9), ValueError, "keys must be"),
        (lambda: (torch.randn(2, 8), torch.randn(3), torch.randn(2, 6)), ValueError, "biases must be"),
        (lambda: (torch.randn(2, 8), torch.randn(2), torch.randn(2, 7)), ValueError, "values must be"),
        (lambda: _p(2, dtype=torch.float64), TypeError, "dtype"),
        (lambda: (torch.randn(2, 8, device="meta"), torch.randn(2), torch.randn(2, 6)), ValueError, "is on meta"),
        (lambda: (torch.full((2, 8), float("nan")), torch.randn(2), torch.randn(2, 6)), ValueError, "NaN or inf"),
        (lambda: (torch.randn(2, 8), torch.tensor([0.0, float("inf")]), torch.randn(2, 6)), ValueError, "NaN or inf"),
        (lambda: _p(0), ValueError, "empty"),
    ],
)
def test_bad_patches_rejected_and_bank_unchanged(args, exc, match) -> None:
    bank = PatchBank(8, 6)
    bank.add(*_p(3))
    before = _snapshot(bank)
    with pytest.raises(exc, match=match):
        bank.add(*args())
    assert _same(_snapshot(bank), before)


def test_unknown_ids_rejected_and_bank_unchanged() -> None:
    bank = PatchBank(8, 6)
    ids = bank.add(*_p(3))
    before = _snapshot(bank)
    with pytest.raises(KeyError, match="unknown patch ids: \\[99\\]"):
        bank.remove([ids[0], 99])
    assert _same(_snapshot(bank), before)


def _patched(name: str = "llama"):
    build, path, _ = TINY[name]
    torch.manual_seed(0)
    model = build()
    return model, PatchedFFN.wrap(model, path), path


def _add_some(ffn: PatchedFFN, n: int = 5) -> list[int]:
    k = torch.randn(n, ffn.bank.d_in) / ffn.bank.d_in**0.5
    return ffn.add_patches(k, torch.zeros(n), torch.randn(n, ffn.bank.d_out), edit_id="e1")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_save_load_into_fresh_copy_is_bit_exact(name: str, tmp_path) -> None:
    model, ffn, path = _patched(name)
    fresh = copy.deepcopy(model)  # same weights, its own PatchedFFN below
    _add_some(ffn)
    ids = _add_some(ffn, 3)
    ffn.remove(ids[:1])
    inputs = model_inputs(name)
    with torch.no_grad():
        want = model(**inputs).logits
    ffn.save(tmp_path / "p.safetensors")
    # fresh process stand-in: an unwrapped copy of the base model, wrapped anew
    for mod in fresh.modules():
        for attr, child in list(mod.named_children()):
            if isinstance(child, PatchedFFN):
                setattr(mod, attr, child.ffn)
    for mod in fresh.modules():
        mod._forward_pre_hooks.clear()
    ffn2 = PatchedFFN.wrap(fresh, path)
    ffn2.load(tmp_path / "p.safetensors")
    assert ffn2.bank.ids == ffn.bank.ids
    assert [r.edit_id for r in ffn2.bank.records()] == [r.edit_id for r in ffn.bank.records()]
    with torch.no_grad():
        got = fresh(**inputs).logits
    assert torch.equal(got, want)
    # metadata says what it belongs to
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["module_path"] == ffn.module_path and meta["dtype"] == "float32"
    assert int(meta["d_in"]) == ffn.bank.d_in and meta["fingerprint"] == ffn.fingerprint()
    # new patches after a reload get fresh ids
    assert _add_some(ffn2, 1)[0] == ffn.bank._next_id


def test_load_refuses_other_model_other_layer_and_corrupt_files(tmp_path) -> None:
    model, ffn, path = _patched("llama")
    _add_some(ffn)
    f = tmp_path / "p.safetensors"
    ffn.save(f)
    before = _snapshot(ffn.bank)

    other_model, other_ffn, _ = _patched("llama")
    with torch.no_grad():
        for p in other_ffn.ffn.parameters():
            p.add_(0.5)
    with pytest.raises(PatchFileError, match="different FFN weights"):
        other_ffn.load(f)
    assert other_ffn.num_patches == 0

    other_layer = PatchedFFN.wrap(model, "model.layers.0.mlp")
    with pytest.raises(PatchFileError, match="for module 'model.layers.1.mlp'"):
        other_layer.load(f)

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(PatchFileError, match="corrupt or truncated"):
        ffn.load(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(PatchFileError, match="not a fastpatch patch file"):
        ffn.load(foreign)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(PatchFileError):
        ffn.load(garbage)
    with pytest.raises(PatchFileError, match="not found"):
        ffn.load(tmp_path / "missing.safetensors")
    assert _same(_snapshot(ffn.bank), before)


def test_load_refuses_inconsistent_metadata(tmp_path) -> None:
    _, ffn, _ = _patched("llama")
    _add_some(ffn)
    f = tmp_path / "p.safetensors"
    ffn.save(f)
    tensors, meta = PatchBank.read_file(f)
    meta["d_in"] = "7"
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(PatchFileError, match="disagree"):
        ffn.load(bad)
    meta["d_in"] = str(ffn.bank.d_in)
    meta["format_version"] = "99"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(PatchFileError, match="version"):
        ffn.load(bad)
    meta["format_version"] = "1"
    meta["records"] = json.dumps([])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(PatchFileError, match="records"):
        ffn.load(bad)


def test_model_state_dict_is_the_base_models() -> None:
    model, ffn, _ = _patched("gpt2")
    _add_some(ffn)
    keys = set(model.state_dict())
    assert not any("_keys" in k or "bank" in k for k in keys)
    sd = ffn.bank.state_dict()
    assert set(sd) == {"keys", "biases", "values", "ids"} and sd["keys"].shape == (5, ffn.bank.d_in)
    # the base model's state dict loads strictly into the patched model (the bank's buffers are not
    # part of it) and leaves the patches alone
    before = _snapshot(ffn.bank)
    result = model.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert _same(_snapshot(ffn.bank), before)


def test_weights_fingerprint_samples_with_a_stride_across_the_whole_tensor() -> None:
    """The fingerprint reads every ``numel // sample``-th value: a change there (near the end of
    the tensor, past the first ``sample`` values) changes it; a change between samples does not."""
    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    late, between = t.clone(), t.clone()
    late.view(-1)[60] += 1.0  # sampled: 60 = 15 * 4
    between.view(-1)[61] += 1.0
    assert weights_fingerprint([late], sample=16) != weights_fingerprint([t], sample=16)
    assert weights_fingerprint([between], sample=16) == weights_fingerprint([t], sample=16)
    assert weights_fingerprint([t.T.contiguous()], sample=64) != weights_fingerprint([t], sample=64)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t, m: m.update(records="not json"), "records are malformed"),
        (lambda t, m: m.update(records=json.dumps([{"idx": 0}] * len(t["ids"]))), "records are malformed"),
        (lambda t, m: m.pop("d_in"), "d_in/d_out missing or not integers"),
        (lambda t, m: m.update(d_out="sixty-four"), "d_in/d_out missing or not integers"),
        (
            lambda t, m: (
                t.update(ids=torch.zeros_like(t["ids"])),
                m.update(records=json.dumps([{**r, "id": 0} for r in json.loads(m["records"])])),
            ),
            "duplicate patch ids",
        ),
    ],
)
def test_malformed_metadata_raises_patch_file_error(edit, match, tmp_path) -> None:
    _, ffn, _ = _patched("llama")
    _add_some(ffn)
    f = tmp_path / "p.safetensors"
    ffn.save(f)
    before = _snapshot(ffn.bank)
    tensors, meta = PatchBank.read_file(f)
    edit(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(PatchFileError, match=match):
        ffn.load(bad)
    assert _same(_snapshot(ffn.bank), before) and len(ffn.bank.records()) == ffn.num_patches


def test_save_is_byte_reproducible(tmp_path) -> None:
    """Same patches, same bytes: saved twice, and saved again after a load into a fresh bank."""
    _, ffn, _ = _patched("llama")
    _add_some(ffn)
    ffn.remove(_add_some(ffn, 2)[:1])
    ffn.save(tmp_path / "a.safetensors")
    ffn.save(str(tmp_path / "b.safetensors"))
    _, ffn2, _ = _patched("llama")  # the same weights, another bank
    ffn2.load(tmp_path / "a.safetensors")
    ffn2.save(tmp_path / "c.safetensors")
    a = (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "b.safetensors").read_bytes() == a
    assert (tmp_path / "c.safetensors").read_bytes() == a
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        ffn.save(tmp_path / "missing-dir" / "p.safetensors")


@pytest.mark.parametrize("saved_in", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_patches_load_into_the_same_model_in_float16(name: str, saved_in: torch.dtype, tmp_path) -> None:
    """The weight check is dtype-independent for float16 too (the bf16-rounded hash alone is not:
    fp16 rounding moves some sampled weights to the next bf16 value); other weights stay refused."""
    model, ffn, path = _patched(name)
    _add_some(ffn)
    src = copy.deepcopy(model).to(saved_in)
    f = tmp_path / "p.safetensors"
    next(m for m in src.modules() if isinstance(m, PatchedFFN)).save(f)
    served = copy.deepcopy(model).half()
    target = next(m for m in served.modules() if isinstance(m, PatchedFFN))
    target.bank.clear()
    assert target.fingerprint() != ffn.fingerprint()  # the case this covers
    target.load(f)
    assert target.bank.ids == ffn.bank.ids and target.bank.dtype == torch.float16
    torch.testing.assert_close(target.bank.keys.float(), ffn.bank.keys, atol=2e-2, rtol=1e-2)
    build, _, _ = TINY[name]
    torch.manual_seed(1)
    other = build().half()
    with pytest.raises(PatchFileError, match="different FFN weights"):
        PatchedFFN.wrap(other, path).load(f)
    # In the dtype it was saved in, a checkpoint that the sparse sample cannot tell apart (a
    # weight between sampled ones changed) is still refused: the tolerance is for another dtype.
    tuned = copy.deepcopy(src)
    tuned_ffn = next(m for m in tuned.modules() if isinstance(m, PatchedFFN))
    with torch.no_grad():
        tuned_ffn.layout.base_tensors()[0][0, 1] += 0.25
    assert weights_match_sample(weights_sample(ffn.layout.base_tensors()), tuned_ffn.layout.base_tensors())
    tuned_ffn.bank.clear()
    with pytest.raises(PatchFileError, match="different FFN weights"):
        tuned_ffn.load(f)


def test_state_dict_round_trip_restores_a_snapshot() -> None:
    """``load_state_dict(state_dict())`` rolls a bank back: same tensors, ids and records; later
    adds get fresh ids. Bad state dicts raise and leave the bank unchanged."""
    bank = PatchBank(8, 6)
    bank.add(*_p(2), edit_id="a")
    bank.add(*_p(3), edit_id="b")
    snap, sd = _snapshot(bank), bank.state_dict()
    bank.remove(bank.ids_for_edit("b"))
    bank.add(*_p(4), edit_id="c")
    result = bank.load_state_dict(sd)
    assert _same(_snapshot(bank), snap) and not result.missing_keys and not result.unexpected_keys
    # the records the bank still had are kept; those removed since the snapshot come back empty
    assert {r.id: r.edit_id for r in bank.records()} == {0: "a", 1: "a", 2: None, 3: None, 4: None}
    new = bank.add(*_p(1))
    assert min(new) > max(snap[3])  # ids are never reused, even after a roll-back

    before = _snapshot(bank)
    bad = [
        ({k: v for k, v in sd.items() if k != "values"}, "missing \\['values'\\]"),
        ({**sd, "extra": torch.zeros(1)}, "unexpected \\['extra'\\]"),
        ({**sd, "keys": torch.zeros(5, 7)}, "keys has shape \\(5, 7\\), expected \\(5, 8\\)"),
        ({**sd, "values": torch.full((5, 6), float("nan"))}, "NaN or inf"),
        ({**sd, "ids": torch.tensor([0, 0, 1, 2, 3])}, "duplicate patch ids"),
    ]
    for state, match in bad:
        with pytest.raises(PatchFileError, match=match):
            bank.load_state_dict(state)
        assert _same(_snapshot(bank), before)
    assert bank.load_state_dict({**sd, "extra": torch.zeros(1)}, strict=False).unexpected_keys == ["extra"]
