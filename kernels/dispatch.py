"""Backend selection: Triton kernels on CUDA, PyTorch elsewhere.

``FASTPATCH_BACKEND`` overrides the automatic choice:

- ``auto`` (default): Triton when the tensor is on CUDA and Triton imports; PyTorch otherwise.
- ``triton``: always Triton. On a CPU tensor this only works under ``TRITON_INTERPRET=1`` (tests).
- ``torch``: always the PyTorch path.
"""

from __future__ import annotations

import functools
import os

import torch

from ._triton import HAS_TRITON, interpret_mode

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTPATCH_BACKEND"


def requested_backend(override: str | None = None) -> str:
    """The backend asked for, by argument or environment; validated."""
    name = (override or os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


def use_triton(t: torch.Tensor, override: str | None = None) -> bool:
    """Whether an op on tensor ``t`` should run its Triton kernel."""
    name = requested_backend(override)
    if name == "torch":
        return False
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not importable on this machine")
        if not t.is_cuda and not interpret_mode():
            raise RuntimeError(
                f"{ENV_VAR}=triton needs a CUDA tensor (got {t.device}); set TRITON_INTERPRET=1 "
                "to run the kernels on the CPU through the interpreter"
            )
        return True
    return HAS_TRITON and t.is_cuda


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, off_gpu: int) -> int:
    """Multiprocessors of a CUDA ``device`` (read once per device: launchers size their grids
    with it on every call), or ``off_gpu`` where the kernels run in the interpreter."""
    if device.type != "cuda":
        return off_gpu
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
