"""PatchBank / PatchedFFN state against a plain dict of patches (issue 18, point 2).

A hypothesis state machine adds, removes, grows, clears, saves and loads (safetensors round trip,
and the ``state_dict`` round trip) in any order; after every step the bank's live ids, keys,
biases and values, its slack rows, and the wrapped FFN's output must equal a reference computed
from a dict ``id -> (key, bias, value)`` in float64.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastpatch import PatchedFFN, PatchFileError
from tests.tiny_models import tiny_llama

D_IN, D_OUT = 64, 64
PATH = "model.layers.-1.mlp"


def _patch_rows(n: int, fire: list[bool], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, D_IN, generator=g) / D_IN**0.5
    biases = torch.tensor([1.0 if f else -50.0 for f in fire])  # -50: silent on every input here
    values = torch.randn(n, D_OUT, generator=g)
    return keys, biases, values


class BankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_llama()
        self.ffn = PatchedFFN.wrap(self.model, PATH, capacity=16, backend="torch")
        self.bank = self.ffn.bank
        self.ref: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.edit_of: dict[int, str] = {}
        self.seen_ids: set[int] = set()
        self.issued: set[int] = set()  # every id handed out in the state the bank now descends from
        self.seed = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="bank-state-"))
        self.x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(123))

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _add(self, n: int, fire: list[bool], edit: str) -> list[int]:
        self.seed += 1
        k, b, v = _patch_rows(n, fire, self.seed)
        ids = self.ffn.add_patches(k, b, v, edit_id=edit)
        assert len(ids) == n and not set(ids) & self.issued, "an id was reused"
        self.issued.update(ids)
        for i, row in zip(ids, range(n)):
            self.ref[i] = (k[row].clone(), b[row].clone(), v[row].clone())
            self.edit_of[i] = edit
        self.seen_ids.update(ids)
        return ids

    @rule(fire=st.lists(st.booleans(), min_size=1, max_size=4), edit=st.sampled_from(["e1", "e2", "e3"]))
    def add(self, fire: list[bool], edit: str) -> None:
        self._add(len(fire), fire, edit)

    @rule()
    def grow(self) -> None:
        """One add that overflows the capacity (the buffers are reallocated and copied)."""
        cap = self.bank.capacity
        n = cap - len(self.ref) + 1
        self._add(n, [i % 3 == 0 for i in range(n)], "bulk")
        assert self.bank.capacity > cap

    @precondition(lambda self: len(self.ref) > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        live = list(self.ref)
        drop = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live), unique=True))
        self.ffn.remove(drop)
        for i in drop:
            del self.ref[i]
            del self.edit_of[i]

    @rule()
    def remove_unknown_changes_nothing(self) -> None:
        before = (self.bank.ids, self.bank.values.clone())
        unknown = max(self.seen_ids, default=0) + 1000
        with pytest.raises(KeyError):
            self.ffn.remove(list(self.ref)[:1] + [unknown])
        assert self.bank.ids == before[0] and torch.equal(self.bank.values, before[1])

    @precondition(lambda self: len(self.ref) > 0)
    @rule(edit=st.sampled_from(["e1", "e2", "e3", "bulk"]))
    def rollback_edit(self, edit: str) -> None:
        ids = self.bank.ids_for_edit(edit)
        assert ids == [i for i in self.ref if self.edit_of[i] == edit]
        if ids:
            self.ffn.remove(ids)
            for i in ids:
                del self.ref[i]
                del self.edit_of[i]

    @rule()
    def clear(self) -> None:
        self.bank.clear()
        self.ref.clear()
        self.edit_of.clear()

    @rule(extra=st.integers(min_value=0, max_value=3))
    def save_then_load(self, extra: int) -> None:
        """Save; change the bank (more patches, or all gone); load: the saved set is back."""
        path = self.tmp / "patches.safetensors"
        self.ffn.save(path)
        saved = dict(self.ref), dict(self.edit_of), set(self.issued)
        if extra:
            self._add(extra, [True] * extra, "after-save")
        else:
            self.bank.clear()
        self.ffn.load(path)
        self.ref, self.edit_of, self.issued = saved

    @rule()
    def load_into_a_fresh_module(self) -> None:
        """The file loads into another PatchedFFN of the same weights: same patches, same output."""
        path = self.tmp / "fresh.safetensors"
        self.ffn.save(path)
        other_model = tiny_llama()
        other_model.load_state_dict(self.model.state_dict())
        other = PatchedFFN.wrap(other_model, PATH, backend="torch")
        other.load(path)
        assert other.bank.ids == self.bank.ids
        for name in ("keys", "biases", "values"):
            assert torch.equal(getattr(other.bank, name), getattr(self.bank, name)), name
        with torch.no_grad():
            torch.testing.assert_close(other(self.x), self.ffn(self.x))

    @rule()
    def state_dict_round_trip(self) -> None:
        sd = self.bank.state_dict()
        self._add(1, [True], "after-snapshot")
        self.bank.load_state_dict(sd)
        for i in [i for i, e in self.edit_of.items() if e == "after-snapshot"]:
            del self.ref[i]
            del self.edit_of[i]

    @rule()
    def load_a_foreign_file_changes_nothing(self) -> None:
        path = self.tmp / "bad.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
        before = self.bank.ids
        with pytest.raises(PatchFileError):
            self.ffn.load(path)
        assert self.bank.ids == before

    # ---------------------------------------------------------------- invariants
    @invariant()
    def bank_equals_reference(self) -> None:
        bank, ref = self.bank, self.ref
        assert bank.num_patches == len(bank) == len(ref)
        assert bank.ids == list(ref)
        assert [r.id for r in bank.records()] == list(ref)
        assert [r.edit_id for r in bank.records()] == [self.edit_of[i] for i in ref]
        if ref:
            assert torch.equal(bank.keys, torch.stack([k for k, _, _ in ref.values()]))
            assert torch.equal(bank.biases, torch.stack([b for _, b, _ in ref.values()]))
            assert torch.equal(bank.values, torch.stack([v for _, _, v in ref.values()]))
        assert bank.keys.shape == (len(ref), D_IN) and bank.values.shape == (len(ref), D_OUT)
        assert bank.capacity >= len(ref)
        # The slack past the live rows holds nothing of a removed patch.
        n = len(ref)
        for name in ("_keys", "_biases", "_values"):
            assert not bool(getattr(bank, name)[n:].any()), f"{name} slack is not zero"

    @invariant()
    def output_equals_reference(self) -> None:
        with torch.no_grad():
            got = self.ffn(self.x).double()
            with self.ffn.patches_disabled():
                want = self.ffn(self.x).double()
        if self.ref:
            K = torch.stack([k for k, _, _ in self.ref.values()]).double()
            b = torch.stack([b for _, b, _ in self.ref.values()]).double()
            V = torch.stack([v for _, _, v in self.ref.values()]).double()
            want = want + torch.relu(self.x.double() @ K.t() + b) @ V
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


BankMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBankState = BankMachine.TestCase


def test_remove_compacts_values_of_the_survivors() -> None:
    """A direct case: remove the middle of three patches; the third's value moves up, the slack is 0."""
    torch.manual_seed(0)
    model = tiny_llama()
    ffn = PatchedFFN.wrap(model, PATH, backend="torch")
    k, b, v = _patch_rows(3, [True, True, True], 7)
    ids = ffn.add_patches(k, b, v)
    ffn.remove([ids[1]])
    assert ffn.bank.ids == [ids[0], ids[2]]
    assert torch.equal(ffn.bank.values, v[[0, 2]])
    assert torch.equal(ffn.bank.keys, k[[0, 2]])
    assert torch.equal(ffn.bank.biases, b[[0, 2]])
    assert not bool(ffn.bank._values[2:].any())


def test_weights_fingerprint_and_sample() -> None:
    from fastpatch.bank import weights_fingerprint, weights_match_sample, weights_sample

    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 300, generator=g)  # more elements than the 65536-value sample: strided
    small = torch.randn(4, 6, generator=g)
    fp = weights_fingerprint([big, small])
    assert len(fp) == 24 and int(fp, 16) >= 0  # 12 bytes, hex
    assert weights_fingerprint([big.bfloat16(), small.bfloat16()]) == fp  # fp32 or its bf16 copy: the same
    assert weights_fingerprint([big, small.reshape(6, 4)]) != fp  # shapes are part of it
    assert weights_fingerprint([big, small + 1]) != fp
    sample = weights_sample([big, small])
    assert [len(v) for _, v in json.loads(sample)] == [32, 24]  # n = 32 values per tensor at most
    assert weights_match_sample(sample, [big.half(), small.bfloat16()])
    assert not weights_match_sample(sample, [big])  # another number of tensors
    assert not weights_match_sample(sample, [big, small.reshape(6, 4)])  # another shape
    assert not weights_match_sample("not json", [big, small])
    other = small.clone()
    other[0, 1] += 1.0  # an element at an odd index: every element of a small tensor is sampled
    assert not weights_match_sample(sample, [big, other])
    tiny = torch.full((8,), 1e-7)
    assert weights_match_sample(weights_sample([tiny]), [tiny + 1.5e-7])  # within the absolute tolerance 2^-22
    assert not weights_match_sample(weights_sample([tiny]), [tiny + 1e-5])


def test_storage_bytes_and_state_dict_keys() -> None:
    from fastpatch import PatchBank

    bank = PatchBank(D_IN, D_OUT, capacity=16)
    assert bank.storage_bytes() == 16 * (D_IN + 1 + D_OUT) * 4
    k, b, v = _patch_rows(2, [True, False], 1)
    bank.add(k, b, v)
    res = bank.load_state_dict({**bank.state_dict(), "extra": torch.zeros(1)}, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == ["extra"]
    with pytest.raises(PatchFileError, match="unexpected"):
        bank.load_state_dict({**bank.state_dict(), "extra": torch.zeros(1)})


def test_bank_construction_and_validation_messages() -> None:
    from fastpatch import PatchBank

    for d_in, d_out in ((0, 5), (5, 0), (-1, 5)):
        with pytest.raises(ValueError, match=rf"d_in and d_out must be positive, got {d_in}, {d_out}"):
            PatchBank(d_in, d_out)
    one = PatchBank(1, 1)
    assert one.capacity == 64 and PatchBank(3, 3, capacity=5).capacity == 16
    half = PatchBank(4, 3, dtype=torch.float16)
    assert {t.dtype for t in (half._keys, half._biases, half._values)} == {torch.float16}
    bank = PatchBank(D_IN, D_OUT, capacity=16)
    k, b, v = _patch_rows(16, [True] * 16, 2)
    with pytest.raises(ValueError, match=r"cannot add an empty set of patches \(n = 0\)"):
        bank.add(k[:0], b[:0], v[:0])
    for name, args in (("keys", (k.double(), b, v)), ("biases", (k, b.double(), v)), ("values", (k, b, v.double()))):
        with pytest.raises(TypeError, match=rf"^{name} has dtype torch.float64, the bank stores torch.float32"):
            bank.add(*args)
    version = bank.version
    bank.add(k, b, v)
    assert bank.capacity == 16 and bank.version == version + 1  # exactly full: no reallocation
    assert bank.state_dict()["ids"].dtype == torch.int64
    assert PatchBank(2, 2).state_dict()["ids"].dtype == torch.int64  # an empty bank too


def test_model_state_dict_holds_no_patches() -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    plain = set(model.state_dict())
    ffn = PatchedFFN.wrap(model, PATH, backend="torch")
    ffn.add_patches(*_patch_rows(3, [True, False, True], 3))
    assert set(model.state_dict()) == plain  # patches are saved on their own


def test_patch_file_bytes_and_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fastpatch import PatchBank

    bank = PatchBank(D_IN, D_OUT)
    bank.add(*_patch_rows(3, [True, False, True], 4))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    bank.save(a)
    bank.save(b)
    raw = a.read_bytes()
    assert raw == b.read_bytes()  # the same patches, the same bytes
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    assert (8 + n) % 8 == 0 and '", "' not in header and header.rstrip().endswith("}")
    meta = json.loads(header)["__metadata__"]
    assert list(meta) == sorted(meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left
    bank.save(tmp_path / "v9.safetensors", {"format_version": "9"})
    with pytest.raises(PatchFileError, match="has patch format version '9'; this fastpatch reads version 1"):
        PatchBank.read_file(tmp_path / "v9.safetensors")
    good = {"magic": "fastpatch.patches", "format_version": "1", "d_in": str(D_IN), "d_out": str(D_OUT)}
    save_file({"keys": torch.zeros(2, D_IN)}, str(tmp_path / "part.safetensors"), metadata=good)
    with pytest.raises(PatchFileError, match=r"lacks tensors \['biases', 'ids', 'values'\]"):
        PatchBank.read_file(tmp_path / "part.safetensors")
    full = {"keys": torch.zeros(2, D_IN), "biases": torch.zeros(2), "values": torch.zeros(2, D_OUT),
            "ids": torch.arange(2)}
    for name, bad in (("values", torch.zeros(2, D_OUT + 1)), ("ids", torch.arange(3)), ("biases", torch.zeros(3))):
        save_file({**full, name: bad}, str(tmp_path / f"bad-{name}.safetensors"), metadata=good)
        with pytest.raises(PatchFileError, match="tensor shapes disagree with its metadata"):
            PatchBank.read_file(tmp_path / f"bad-{name}.safetensors")
