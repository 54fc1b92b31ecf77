"""Fused memory loss of patch training (kernels/patch_loss.py) against its float64 reference.

On a machine without a GPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set
below before the kernels are first used); with CUDA and TRITON_INTERPRET=0 the same tests run the
compiled kernels on the GPU (and add bf16).
"""

from __future__ import annotations

import os

# The interpreter must be chosen before triton is first imported (triton jit-decorates its own
# library, tl.zeros & co., at import); conftest.py and `make test` set it too. If something imported
# triton earlier without it, the CPU Triton tests skip and say so (see _interpreter_usable).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastpatch.kernels._triton import HAS_TRITON, interpret_mode  # noqa: E402
from fastpatch.kernels.patch_loss import (  # noqa: E402
    PatchMemoryLoss,
    memory_loss_bytes,
    patch_memory_loss,
    patch_memory_loss_reference,
    patch_preactivations,
)
from fastpatch.kernels.testing import assert_close_to_ref  # noqa: E402



def _interpreter_usable() -> bool:
    """TRITON_INTERPRET=1 and triton was imported under it (its library is interpreted too)."""
    if not (HAS_TRITON and interpret_mode()):
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


DEVICE = "cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu"
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or _interpreter_usable())
needs_triton = pytest.mark.skipif(
    not TRITON_OK,
    reason="Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported (run: make test)",
)
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

pytestmark = pytest.mark.interpret


def _inputs(N, d, n, dtype, seed=0, key_scale=None):
    g = torch.Generator().manual_seed(seed)
    mem = torch.randn(N, d, generator=g).to(dtype)
    # keys like the method's init (q / ||q||^2): pre-activations O(1), so exp(A + 3) stays moderate
    scale = key_scale if key_scale is not None else 1.0 / d**0.5
    keys = torch.randn(n, d, generator=g) * scale
    bias = torch.randn(n, generator=g) * 0.1
    a_edit = 1.0 + torch.randn(n, generator=g) * 0.1
    return mem.to(DEVICE), keys.to(DEVICE), bias.to(DEVICE), a_edit.to(DEVICE)


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


def _run(fn, mem, keys, bias, a_edit, topk, margin, c1=1.0, c2=0.7, **kw):
    """Losses and grads (keys, bias, a_edit) of c1*sum(l_m1) + c2*sum(l_m2)."""
    k, b, a = _leaves(keys, bias, a_edit)
    l1, l2 = fn(mem, k, b, a, topk, margin, **kw)
    (c1 * l1.sum() + c2 * l2.sum()).backward()
    return l1.detach(), l2.detach(), k.grad, b.grad, a.grad


def _run_ref(mem, keys, bias, a_edit, topk, margin, **kw):
    return _run(
        patch_memory_loss_reference, mem.double(), keys.double(), bias.double(), a_edit.double(),
        topk, margin, **kw,
    )


def _reference_on_rows(mem, keys, bias, a_edit, idx, margin, c1=1.0, c2=0.7):
    """float64 reference restricted to given selected rows idx (k, n): the gradient the kernel must
    give for whatever rows torch.topk selected."""
    k_, b_, a_ = _leaves(keys, bias, a_edit, dtype=torch.float64)
    m = mem.double()
    A = torch.stack([m[idx[:, j]] @ k_[j] + b_[j] for j in range(idx.shape[1])], dim=1)  # (k, n)
    l1 = torch.exp(A - a_ + margin).mean(0)
    l2 = torch.exp(A + margin).mean(0)
    (c1 * l1.sum() + c2 * l2.sum()).backward()
    return l1.detach(), l2.detach(), k_.grad, b_.grad, a_.grad


def _compare(out, ref, tol_dtype):
    for o, r in zip(out, ref):
        assert_close_to_ref(o, r, tol_dtype, scale=max(1.0, r.abs().max().item()))


# Odd shapes; topk 1000 > N for the small N; n = 17 pads to 32 for tl.dot.
CASES = [
    # N,   d,   n,  topk
    (1, 64, 1, 1000),
    (1, 113, 5, 1),
    (37, 113, 1, 5),
    (37, 64, 5, 1000),
    (37, 113, 17, 5),
    (1017, 64, 1, 1000),
    (1017, 113, 5, 5),
    (1017, 113, 17, 1000),
    (1017, 64, 17, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d,n,topk", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, N, d, n, topk, dtype):
    mem, keys, bias, a_edit = _inputs(N, d, n, dtype, seed=N + d + n + topk)
    out = _run(patch_memory_loss, mem, keys, bias, a_edit, topk, 3.0, backend=backend)
    ref = _run_ref(mem, keys, bias, a_edit, topk, 3.0)
    # fp16/fp32 memory: the reference sees the same (exactly representable) values and the kernel
    # computes A to ~fp32 (keys split hi + lo), so fp32's tolerance applies. bf16: its own entry.
    _compare(out, ref, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    for g, t in zip(out[2:], (keys, bias, a_edit)):
        assert g.dtype == t.dtype and g.shape == t.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d,n", [(37, 113, 5), (1017, 64, 17), (201, 33, 70)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preactivations(backend, N, d, n, dtype):
    mem, keys, bias, _ = _inputs(N, d, n, dtype, seed=3)
    A = patch_preactivations(mem, keys, bias, backend=backend)
    assert A.shape == (N, n) and A.dtype == torch.float32
    ref = mem.double() @ keys.double().t() + bias.double()
    assert_close_to_ref(A, ref, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_loss_and_partial_grads(backend):
    mem, keys, bias, a_edit = _inputs(211, 47, 3, torch.float32, seed=5)
    k, b = _leaves(keys, bias)
    l1, l2 = patch_memory_loss(mem, k, b, a_edit, topk=20, backend=backend)  # a_edit: no grad
    l2.sum().backward()  # l_m1 unused: its incoming grad is None
    kr, br = _leaves(keys, bias, dtype=torch.float64)
    r1, r2 = patch_memory_loss_reference(mem.double(), kr, br, a_edit.double(), topk=20)
    r2.sum().backward()
    assert_close_to_ref(k.grad, kr.grad, torch.float32, scale=kr.grad.abs().max().item())
    assert_close_to_ref(b.grad, br.grad, torch.float32, scale=br.grad.abs().max().item())


def _tied_memory(dtype):
    """Integer-valued data: A is exact in fp16, fp32 and fp64, with many exactly equal values."""
    g = torch.Generator().manual_seed(11)
    N, d, n = 97, 40, 3
    mem = torch.randint(-1, 2, (N, d), generator=g).float()
    mem[60:70] = mem[5]  # ten duplicates of row 5
    keys = torch.randint(-1, 2, (n, d), generator=g).float() * 0.125  # exact in every dtype
    bias = torch.tensor([0.0, 0.25, -0.5])
    a_edit = torch.tensor([1.0, 0.5, 2.0])
    return mem.to(dtype).to(DEVICE), keys.to(DEVICE), bias.to(DEVICE), a_edit.to(DEVICE)


def _has_boundary_ties(A, k):
    vals = torch.sort(A, dim=0, descending=True).values
    kth = vals[k - 1]
    return bool(((A == kth).sum(0) > (vals[:k] == kth).sum(0)).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("topk", [4, 9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_topk_boundary(backend, topk, dtype):
    mem, keys, bias, a_edit = _tied_memory(dtype)
    A = patch_preactivations(mem, keys, bias, backend=backend)
    assert _has_boundary_ties(A, topk), "test data must tie at the k-th value"
    out = _run(patch_memory_loss, mem, keys, bias, a_edit, topk, 3.0, backend=backend)
    # Loss values are tie-invariant: equal to the plain reference's.
    ref = _run_ref(mem, keys, bias, a_edit, topk, 3.0)
    _compare(out[:2], ref[:2], torch.float32)
    _compare(out[3:], ref[3:], torch.float32)  # bias and a_edit grads depend only on the values
    # The keys' gradient is the reference's for exactly the rows torch.topk selected.
    idx = torch.topk(A, topk, dim=0).indices
    on_rows = _reference_on_rows(mem, keys, bias, a_edit, idx, 3.0)
    _compare(out, on_rows, torch.float32)


def test_duplicate_rows_tie_grad_matches_plain_reference():
    """Ties among identical rows: any tie-break gives the same gradient, so it must equal the plain
    reference's, on both backends."""
    mem, keys, bias, a_edit = _inputs(53, 29, 4, torch.float32, seed=2)
    A = mem.double() @ keys.double().t() + bias.double()
    top = A.argmax(0)
    mem[20:26] = mem[top[0]]  # 7 copies of column 0's best row; topk=3 picks 3 of them
    for j in range(1, 4):
        mem[30 + 3 * j: 33 + 3 * j] = mem[top[j]]
    for backend in (["triton"] if TRITON_OK else []) + ["torch"]:
        out = _run(patch_memory_loss, mem, keys, bias, a_edit, 3, 3.0, backend=backend)
        ref = _run_ref(mem, keys, bias, a_edit, 3, 3.0)
        _compare(out, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_select_same_rows(backend):
    """Both backends run torch.topk on the same exact fp32 A: identical gradients under ties."""
    if not TRITON_OK:
        pytest.skip("needs both backends")
    mem, keys, bias, a_edit = _tied_memory(torch.float32)
    a = _run(patch_memory_loss, mem, keys, bias, a_edit, 9, 3.0, backend="triton")
    b = _run(patch_memory_loss, mem, keys, bias, a_edit, 9, 3.0, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(7)
    mem = torch.randn(23, 9, generator=g, dtype=torch.float64).to(DEVICE)
    keys = (torch.randn(3, 9, generator=g, dtype=torch.float64) * 0.3).to(DEVICE).requires_grad_()
    bias = (torch.randn(3, generator=g, dtype=torch.float64) * 0.1).to(DEVICE).requires_grad_()
    a_edit = torch.ones(3, dtype=torch.float64, device=DEVICE).requires_grad_()

    def fn(k, b, a):  # the Function itself, with the backend forced
        return PatchMemoryLoss.apply(mem, k, b, a, 5, 3.0, backend)

    assert torch.autograd.gradcheck(fn, (keys, bias, a_edit), eps=1e-6, atol=1e-6, rtol=1e-5)
    # ... and its gradients equal the reference's (autograd through matmul/topk/exp/mean).
    out = _run(patch_memory_loss, mem, keys, bias, a_edit, 5, 3.0, backend=backend)
    ref = _run_ref(mem, keys, bias, a_edit, 5, 3.0)
    _compare(out, ref, torch.float64)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(8)
    mem = torch.randn(15, 6, generator=g, dtype=torch.float64)
    args = [
        (torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.3).requires_grad_(),
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
        torch.ones(2, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda k, b, a: patch_memory_loss_reference(mem, k, b, a, 4), args)


def test_memory_loss_bytes():
    assert memory_loss_bytes(40_000, 4096, 20, 1000, torch.bfloat16) == 40_000 * 4096 * 2 + 1000 * 20 * 4096 * 2
    assert memory_loss_bytes(10, 8, 3, 1000, torch.float32) == 10 * 8 * 4 + 10 * 3 * 8 * 4  # k = min(k, N)
    assert memory_loss_bytes(10, 8, 3, 5, 2) == 10 * 8 * 2 + 5 * 3 * 8 * 2


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m, k, b, a: (m[0], k, b, a), "memory must be 2-D"),
        (lambda m, k, b, a: (m[:0], k, b, a), "N >= 1"),
        (lambda m, k, b, a: (m, k[:, :-1], b, a), r"keys must have shape \(n, d\) with d = memory.shape\[1\] = 8"),
        (lambda m, k, b, a: (m, k, b[:-1], a), r"bias must have shape \(n,\)"),
        (lambda m, k, b, a: (m, k, b[:, None], a), r"bias must have shape \(n,\)"),
        (lambda m, k, b, a: (m, k, b, a[:2]), r"a_edit must have shape \(n,\)"),
        (lambda m, k, b, a: (m, k[:0], b[:0], a[:0]), "n >= 1"),
        (lambda m, k, b, a: (m.long(), k, b, a), "memory dtype"),
        (lambda m, k, b, a: (m, k.long(), b, a), "keys must have a floating dtype"),
        (lambda m, k, b, a: (m, k.to("meta"), b, a), "keys is on meta but memory is on"),
        (lambda m, k, b, a: (m, k, b, a.to("meta")), "a_edit is on meta"),
    ],
)
def test_bad_inputs(change, match):
    m, k, b, a = _inputs(5, 8, 3, torch.float32)
    m, k, b, a = change(m, k, b, a)
    with pytest.raises((ValueError, TypeError), match=match):
        patch_memory_loss(m, k, b, a, backend="torch")


def test_bad_topk_and_backend():
    m, k, b, a = _inputs(5, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        patch_memory_loss(m, k, b, a, topk=0, backend="torch")
    with pytest.raises(ValueError, match="not a backend"):
        patch_memory_loss(m, k, b, a, backend="cuda")


@needs_triton
def test_noncontiguous_memory_rejected_by_kernel():
    m, k, b, a = _inputs(8, 5, 3, torch.float32)
    mem_t = torch.randn(5, 8, device=DEVICE).t()  # (8, 5) with last-dim stride 8
    with pytest.raises(ValueError, match="contiguous last dim"):
        patch_memory_loss(mem_t, k, b, a, backend="triton")
    with pytest.raises(ValueError, match="contiguous last dim"):
        patch_preactivations(mem_t, k, b, backend="triton")
    patch_memory_loss(mem_t, k, b, a, backend="torch")  # the torch path accepts any strides


@needs_triton
def test_strided_inputs_ok():
    """Row stride != d (a slice of a wider buffer), strided keys and bias: strides are kernel
    arguments, no copies."""
    big, big_keys, big_bias, a_edit = _inputs(41, 90, 10, torch.float32, seed=4)
    mem = big[:, 7:70]
    keys = big_keys[::2, 7:70]  # (5, 63), strides (180, 1)
    bias = big_bias[::2]
    a_edit = a_edit[::2]
    out = _run(patch_memory_loss, mem, keys, bias, a_edit, 6, 3.0, backend="triton")
    ref = _run_ref(mem, keys, bias, a_edit, 6, 3.0)
    _compare(out, ref, torch.float32)
    A = patch_preactivations(mem, keys.t().contiguous().t(), bias, backend="triton")  # column-major keys
    assert_close_to_ref(A, mem.double() @ keys.double().t() + bias.double(), torch.float32)
