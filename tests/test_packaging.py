"""Packaging: the repository's kernels/ folder never shadows Hugging Face's ``kernels``.

transformers imports the Hugging Face package ``kernels`` (hub kernels). A regular package named
``kernels`` in the repository root would win that name whenever the root is on ``sys.path``:
``python`` or ``pytest`` started there. These tests start fresh interpreters from the root, the way
a user does, so they fail if the folder ever becomes importable as ``kernels`` again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import kernels"], cwd="/", capture_output=True).returncode != 0,
    reason="Hugging Face `kernels` is not installed (it is in the dev extras and the lock)",
)


def _is_hf_kernels(path: str) -> bool:
    """Whether ``path`` is Hugging Face's installed package (the venv may live inside the checkout)."""
    p = Path(path).resolve()
    return "site-packages" in p.parts and not p.is_relative_to((ROOT / "kernels").resolve())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSAFEPATH", None)
    return env


def _python(code: str, *flags: str) -> str:
    """Run ``python [flags] -c code`` from the repository root; return its stdout (fail on error)."""
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"python {' '.join(flags)} -c ... failed from the root:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_transformers_hub_kernels_import_from_the_repository_root() -> None:
    out = _python(
        "import importlib.util, transformers.activations, transformers.integrations.hub_kernels, kernels\n"
        "print(importlib.util.find_spec('kernels').origin); print(kernels.__file__)"
    )
    spec_origin, module_file = out.split()
    for path in (spec_origin, module_file):
        assert _is_hf_kernels(path), f"`kernels` does not resolve to Hugging Face's package: {path}"


def test_repository_kernels_folder_is_not_a_regular_package() -> None:
    # A regular package (with __init__.py) there would win the name `kernels` from the root.
    assert (ROOT / "kernels" / "fused_ffn.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("flags", [(), ("-P",)], ids=["root-on-path", "safe-path"])
def test_fastpatch_kernels_import_from_the_root(flags: tuple[str, ...]) -> None:
    out = _python(
        "import transformers.activations, fastpatch, fastpatch.kernels.fused_ffn as f, fastpatch.kernels.dispatch as d\n"
        "print(f.__name__, d.__file__)", *flags
    )
    name, path = out.split()
    assert name == "fastpatch.kernels.fused_ffn"
    assert Path(path).resolve() == (ROOT / "kernels" / "dispatch.py").resolve()


def test_pytest_from_the_root_imports_transformers_with_the_real_kernels(tmp_path: Path) -> None:
    # `python -m pytest` puts the root first on sys.path; collect one test module that imports transformers.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "tests/test_patched_ffn.py"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-2000:]


def test_wheel_installs_kernels_only_as_fastpatch_kernels(tmp_path: Path) -> None:
    """The built wheel has one top-level package, and its kernels import from an installed copy."""
    # Build from a copy: setuptools builds in-tree, and a stale build/ folder would leak old files.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".benchmarks", "results"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("fastpatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info" not in n.split("/")[0]}
    assert top == {"fastpatch"}
    assert {"fastpatch/kernels/fused_ffn.py", "fastpatch/kernels/reference.py"} <= set(names)
    # Unpack it as an install would and import from there, the repository off sys.path.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = _env()
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-P", "-c",
                          "import fastpatch, fastpatch.kernels.dispatch as d, kernels; print(d.__file__, kernels.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dispatch_file, hf_file = out.stdout.split()
    assert Path(dispatch_file).resolve() == (site / "fastpatch" / "kernels" / "dispatch.py").resolve()
    assert _is_hf_kernels(hf_file) and not Path(hf_file).resolve().is_relative_to(site.resolve())


def test_library_imports_and_runs_without_triton() -> None:
    """Every kernel module imports where Triton is missing, and PatchedFFN runs its PyTorch path."""
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def no_triton(name, *a, **k):\n"
        "    if name == 'triton' or name.startswith('triton.'):\n"
        "        raise ImportError('Triton is not installed')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = no_triton\n"
        "import torch\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "from fastpatch import PatchedFFN\n"
        "from fastpatch.kernels import _triton, dispatch, fused_ffn, ops, patch_forward, patch_loss, reference\n"
        "assert not _triton.HAS_TRITON\n"
        "torch.manual_seed(0)\n"
        "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "before = model(ids).logits\n"
        "ffn = PatchedFFN.wrap(model, 'transformer.h.-1.mlp')\n"
        "ffn.add_patches(torch.randn(2, 32), torch.full((2,), 5.0), torch.randn(2, 32))\n"
        "print(bool((model(ids).logits - before).abs().max() > 0))\n"
    )
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True"]
