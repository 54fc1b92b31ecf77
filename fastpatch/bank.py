"""The patch bank: keys, biases and values of every patch neuron in preallocated tensors.

Storage is three contiguous buffers of ``capacity`` rows; the first ``num_patches`` rows are
live. Adding a patch writes into the slack and doubles the capacity only when it runs out
(amortised O(1) per patch, and at most 2x slack). Removing patches compacts the live rows, so
the kernels always see one dense (P, d) block.

Every patch has a stable integer id (never reused) and a record of the edit that made it and
when. Patches are saved with safetensors; the file's metadata identifies the FFN it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .atomic import atomic_file

__all__ = [
    "PatchBank", "PatchRecord", "PatchFileError", "FORMAT_VERSION", "weights_fingerprint", "weights_sample",
    "weights_match_sample",
]

#: Version of the patch file layout. Bump on an incompatible change.
FORMAT_VERSION = "1"
_MAGIC = "fastpatch.patches"
_MIN_CAPACITY = 16


class PatchFileError(ValueError):
    """A patch file that is corrupt, foreign, or made for another model or layer."""


@dataclass
class PatchRecord:
    """Metadata of one patch neuron."""

    id: int
    edit_id: str | None = None
    created: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


def weights_fingerprint(tensors: Sequence[torch.Tensor], sample: int = 1 << 16) -> str:
    """A short hash that identifies FFN weights, independent of their float dtype and device.

    Hashes the shapes and a strided sample of each tensor rounded to bfloat16, so the same
    checkpoint loaded in fp32 or bf16 gives the same fingerprint and a different layer or model
    does not.
    """
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        s = flat[::step][:sample].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        h.update(repr(tuple(t.shape)).encode())
        h.update(s.numpy().tobytes())
    return h.hexdigest()


#: Relative and absolute tolerance of :func:`weights_match_sample`: the same weights rounded to
#: bf16 (2^-9) and to fp16 (2^-11, subnormals below 2^-14 to 2^-24 absolute) stay within them.
_SAMPLE_RTOL, _SAMPLE_ATOL = 2.0**-7, 2.0**-22


def _sample_values(t: torch.Tensor, n: int) -> list[float]:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to(device="cpu", dtype=torch.float32).tolist()


def weights_sample(tensors: Sequence[torch.Tensor], n: int = 32) -> str:
    """Shapes and ``n`` strided values of each tensor (JSON): FFN weights compared with a tolerance.

    The exact :func:`weights_fingerprint` rounds to bfloat16, so weights loaded in float16 (or
    fp32 weights and their bf16 copy rounded through float16) can hash differently; this sample
    still tells the same checkpoint in another dtype from another model or layer.
    """
    return json.dumps([[list(t.shape), _sample_values(t, n)] for t in tensors])


def weights_match_sample(sample: str, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` have the shapes and, up to float16/bfloat16 rounding, the values of ``sample``."""
    try:
        want = json.loads(sample)
        if len(want) != len(tensors):
            return False
        for (shape, values), t in zip(want, tensors):
            if list(shape) != list(t.shape):
                return False
            got = torch.tensor(_sample_values(t, len(values)), dtype=torch.float64)
            ref = torch.tensor(values, dtype=torch.float64)
            if got.shape != ref.shape or not torch.allclose(got, ref, rtol=_SAMPLE_RTOL, atol=_SAMPLE_ATOL):
                return False
    except (ValueError, TypeError):  # malformed sample: no match
        return False
    return True


class PatchBank(nn.Module):
    """Growable storage of patch neurons (key ``d_in``, bias, value ``d_out``).

    Args:
        d_in: FFN input size (key size).
        d_out: FFN output size (value size).
        dtype / device: storage dtype and device; follow the wrapped FFN (``.to()`` moves them).
        capacity: initial number of rows.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        capacity: int = 64,
    ) -> None:
        super().__init__()
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"d_in and d_out must be positive, got {d_in}, {d_out}")
        self.d_in, self.d_out = int(d_in), int(d_out)
        cap = max(_MIN_CAPACITY, int(capacity))
        # Non-persistent: a model's own state_dict stays loadable by plain transformers; the
        # patches are saved with `save` / `state_dict()` of the bank.
        self.register_buffer("_keys", torch.zeros(cap, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("_biases", torch.zeros(cap, dtype=dtype, device=device), persistent=False)
        self.register_buffer("_values", torch.zeros(cap, d_out, dtype=dtype, device=device), persistent=False)
        self._n = 0
        self._ids: list[int] = []
        self._records: dict[int, PatchRecord] = {}
        self._next_id = 0
        self.version = 0  # bumped on every change; caches key on it

    # ------------------------------------------------------------------ views
    @property
    def num_patches(self) -> int:
        """Number of live patches."""
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        """Rows allocated (live plus slack)."""
        return self._keys.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        """(P, d_in) view of the live keys."""
        return self._keys[: self._n]

    @property
    def biases(self) -> torch.Tensor:
        """(P,) view of the live biases."""
        return self._biases[: self._n]

    @property
    def values(self) -> torch.Tensor:
        """(P, d_out) view of the live values."""
        return self._values[: self._n]

    @property
    def dtype(self) -> torch.dtype:
        return self._keys.dtype

    @property
    def device(self) -> torch.device:
        return self._keys.device

    @property
    def ids(self) -> list[int]:
        """Stable ids of the live patches, in storage order."""
        return list(self._ids)

    def records(self) -> list[PatchRecord]:
        """Metadata of the live patches, in storage order."""
        return [self._records[i] for i in self._ids]

    def ids_for_edit(self, edit_id: str) -> list[int]:
        """Ids of the patches made by edit ``edit_id``."""
        return [i for i in self._ids if self._records[i].edit_id == edit_id]

    def storage_bytes(self) -> int:
        """Bytes allocated for patch storage (capacity rows)."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._biases, self._values))

    # --------------------------------------------------------------- mutation
    def _validate_new(self, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor) -> int:
        if keys.dim() != 2 or keys.shape[1] != self.d_in:
            raise ValueError(f"keys must be (n, d_in={self.d_in}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n == 0:
            raise ValueError("cannot add an empty set of patches (n = 0)")
        if biases.shape != (n,):
            raise ValueError(f"biases must be (n={n},), got {tuple(biases.shape)}")
        if values.shape != (n, self.d_out):
            raise ValueError(f"values must be (n={n}, d_out={self.d_out}), got {tuple(values.shape)}")
        for name, t in (("keys", keys), ("biases", biases), ("values", values)):
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, the bank stores {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the bank is on {self.device}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf")
        return n

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        for name in ("_keys", "_biases", "_values"):
            old = getattr(self, name)
            new = old.new_zeros((new_cap,) + tuple(old.shape[1:]))
            new[: self._n] = old[: self._n]
            setattr(self, name, new)  # re-registers the buffer

    @torch.no_grad()
    def add(
        self,
        keys: torch.Tensor,
        biases: torch.Tensor,
        values: torch.Tensor,
        edit_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[int]:
        """Append ``n`` patches; return their new ids. Validates before touching the bank."""
        n = self._validate_new(keys, biases, values)
        self._grow(self._n + n)
        s = slice(self._n, self._n + n)
        self._keys[s] = keys
        self._biases[s] = biases
        self._values[s] = values
        new_ids = list(range(self._next_id, self._next_id + n))
        now = time.time()
        for i in new_ids:
            self._records[i] = PatchRecord(i, edit_id, now, dict(extra or {}))
        self._ids.extend(new_ids)
        self._next_id += n
        self._n += n
        self.version += 1
        return new_ids

    @torch.no_grad()
    def remove(self, ids: Iterable[int]) -> None:
        """Remove patches by id (e.g. the rollback of one edit). Unknown ids raise, nothing changes."""
        ids = [int(i) for i in ids]
        unknown = sorted(set(ids) - set(self._records))
        if unknown:
            raise KeyError(f"unknown patch ids: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        drop = set(ids)
        if not drop:
            return
        keep = [pos for pos, i in enumerate(self._ids) if i not in drop]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        m = len(keep)
        self._keys[:m] = self._keys.index_select(0, idx)
        self._biases[:m] = self._biases.index_select(0, idx)
        self._values[:m] = self._values.index_select(0, idx)
        self._keys[m : self._n] = 0
        self._biases[m : self._n] = 0
        self._values[m : self._n] = 0
        self._ids = [self._ids[p] for p in keep]
        for i in drop:
            del self._records[i]
        self._n = m
        self.version += 1

    @torch.no_grad()
    def clear(self) -> None:
        """Remove every patch."""
        self.remove(self.ids)

    # ------------------------------------------------------------ persistence
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:  # type: ignore[override]
        """The live patches as tensors (``keys``, ``biases``, ``values``, ``ids``).

        Called by a parent module's ``state_dict`` (with a ``destination``), it adds nothing:
        patches are saved on their own, so the model's state dict stays that of the base model.
        """
        if destination is not None or args:
            return destination if destination is not None else args[0]
        return {
            "keys": self.keys.detach().clone(),
            "biases": self.biases.detach().clone(),
            "values": self.values.detach().clone(),
            "ids": torch.tensor(self._ids, dtype=torch.int64),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Replace the live patches with those of ``state_dict()`` output (a PEFT-style round trip,
        e.g. to roll a bank back to a snapshot). Records of ids this bank knows are kept; others
        get an empty record. Bad content (missing tensors, other sizes, NaN/inf, duplicate ids)
        raises ``PatchFileError`` and leaves the bank unchanged; with ``strict``, so do unknown
        keys. Returns the missing and unexpected keys, as ``nn.Module.load_state_dict`` does."""
        from torch.nn.modules.module import _IncompatibleKeys

        want = ("keys", "biases", "values", "ids")
        missing = [k for k in want if k not in state_dict]
        unexpected = [k for k in state_dict if k not in want]
        if missing or (strict and unexpected):
            raise PatchFileError(f"bank state dict: missing {missing}, unexpected {unexpected}; expected the keys "
                                 f"of PatchBank.state_dict(): {list(want)}")
        tensors = {k: state_dict[k] for k in want}
        n = tensors["ids"].numel()
        for name, shape in (("keys", (n, self.d_in)), ("biases", (n,)), ("values", (n, self.d_out))):
            if tuple(tensors[name].shape) != shape:
                raise PatchFileError(f"bank state dict: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                     f"for {n} ids and this bank's d_in={self.d_in}, d_out={self.d_out}")
        ids = [int(i) for i in tensors["ids"].tolist()]
        records = [asdict(self._records.get(i) or PatchRecord(id=i)) for i in ids]
        meta = {"d_in": str(self.d_in), "d_out": str(self.d_out), "next_id": str(self._next_id),
                "records": json.dumps(records)}
        self.load_tensors(tensors, meta)
        return _IncompatibleKeys([], unexpected)

    def metadata(self) -> dict[str, str]:
        """Bank metadata as strings (safetensors header)."""
        return {
            "magic": _MAGIC,
            "format_version": FORMAT_VERSION,
            "d_in": str(self.d_in),
            "d_out": str(self.d_out),
            "dtype": str(self.dtype).replace("torch.", ""),
            "next_id": str(self._next_id),
            "records": json.dumps([asdict(self._records[i]) for i in self._ids]),
        }

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the live patches to a safetensors file, atomically (write, then rename).

        The same patches and metadata always give the same bytes (the metadata is written in
        sorted order; safetensors alone writes it in a random order).
        """
        from safetensors.torch import save

        tensors = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        meta = self.metadata()
        meta.update(metadata or {})
        data = memoryview(save(tensors, metadata=meta))
        n = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + n]))
        header = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        with atomic_file(path, "wb", parents=False) as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.write(data[8 + n :])

    @staticmethod
    def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read and validate a patch file; return (tensors, metadata). Raises ``PatchFileError``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PatchFileError(f"patch file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except PatchFileError:
            raise
        except Exception as e:  # safetensors raises its own error types on corrupt headers/data
            raise PatchFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        if meta.get("magic") != _MAGIC:
            raise PatchFileError(f"{path} is not a fastpatch patch file (no '{_MAGIC}' metadata)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise PatchFileError(
                f"{path} has patch format version {meta.get('format_version')!r}; "
                f"this fastpatch reads version {FORMAT_VERSION}"
            )
        missing = {"keys", "biases", "values", "ids"} - set(tensors)
        if missing:
            raise PatchFileError(f"{path} lacks tensors {sorted(missing)}")
        n = tensors["keys"].shape[0]
        try:
            d_in, d_out = int(meta["d_in"]), int(meta["d_out"])
        except (KeyError, ValueError) as e:
            raise PatchFileError(f"{path}: metadata d_in/d_out missing or not integers ({e!r})") from None
        if (
            tensors["keys"].shape != (n, d_in)
            or tensors["biases"].shape != (n,)
            or tensors["values"].shape != (n, d_out)
            or tensors["ids"].shape != (n,)
        ):
            raise PatchFileError(f"{path}: tensor shapes disagree with its metadata (d_in={d_in}, d_out={d_out})")
        return tensors, meta

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Replace the bank's content with validated file content (casts to the bank's dtype)."""
        d_in, d_out = int(meta["d_in"]), int(meta["d_out"])
        if (d_in, d_out) != (self.d_in, self.d_out):
            raise PatchFileError(
                f"patch file is for an FFN of d_in={d_in}, d_out={d_out}; this one has "
                f"d_in={self.d_in}, d_out={self.d_out}"
            )
        keys = tensors["keys"].to(self.device, self.dtype)
        biases = tensors["biases"].to(self.device, self.dtype)
        values = tensors["values"].to(self.device, self.dtype)
        for name, t in (("keys", keys), ("biases", biases), ("values", values)):
            if not bool(torch.isfinite(t).all()):
                raise PatchFileError(f"patch file {name} contain NaN or inf")
        try:
            records = [PatchRecord(**r) for r in json.loads(meta.get("records", "[]"))]
        except (ValueError, TypeError) as e:  # not JSON, not a list of records, unknown fields
            raise PatchFileError(f"patch file records are malformed: {e}") from None
        ids = [int(i) for i in tensors["ids"].tolist()]
        if len(records) != len(ids) or [r.id for r in records] != ids:
            raise PatchFileError("patch file records do not match its ids")
        if len(set(ids)) != len(ids):
            raise PatchFileError("patch file has duplicate patch ids")
        n = len(ids)
        # Everything validated: now mutate.
        cap = max(_MIN_CAPACITY, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
        self._keys = keys.new_zeros(max(cap, self.capacity) if n <= self.capacity else cap, d_in)
        self._biases = biases.new_zeros(self._keys.shape[0])
        self._values = values.new_zeros(self._keys.shape[0], d_out)
        self._keys[:n], self._biases[:n], self._values[:n] = keys, biases, values
        self._n = n
        self._ids = ids
        self._records = {r.id: r for r in records}
        self._next_id = max(int(meta.get("next_id", 0)), (max(ids) + 1) if ids else 0)
        self.version += 1

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, patches={self._n}, capacity={self.capacity}, dtype={self.dtype}"
