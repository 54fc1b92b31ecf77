"""Shared test fixtures. Triton kernels run on the CPU through TRITON_INTERPRET=1."""

from __future__ import annotations

import os

# Must be set before any Triton kernel is defined (the Makefile sets it too).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastpatch.kernels.dispatch import HAS_TRITON  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

#: Odd, unaligned sizes in the FlagGems style (2^k + 17 among them).
ODD_D = (64, 96 + 17, 576)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models gain nothing from two, and two OpenMP
    threads on a busy 2-core machine can slow every op down tenfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
