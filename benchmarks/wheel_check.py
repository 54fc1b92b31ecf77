"""Build fastpatch's wheel and use it the way a user would (``make wheel-check``).

1. ``pip wheel .`` (no dependencies) into a temporary folder outside the repository.
2. A fresh venv there: the locked CPU torch first, then the wheel with its dependencies resolved
   against ``requirements/ci-lock.txt``.
3. From that folder (the repository nowhere on ``sys.path``): transformers' hub-kernels integration
   imports, ``import kernels`` is Hugging Face's package, ``fastpatch.kernels`` is the installed
   subpackage, and one edit on a tiny Llama built from a config succeeds and rolls back.

Prints each step and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "ci-lock.txt"

#: Runs inside the fresh venv, from a folder outside the repository.
USER_SCRIPT = r'''
import importlib.util, pathlib, sys
import torch
import transformers.integrations.hub_kernels  # imports Hugging Face `kernels`
import kernels
import fastpatch, fastpatch.kernels.dispatch as dispatch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from fastpatch.editor import Editor, EditorConfig, EditRequest

site = pathlib.Path(fastpatch.__file__).resolve().parent
assert "site-packages" in str(site), site
assert pathlib.Path(dispatch.__file__).resolve().parent == site / "kernels", dispatch.__file__
hf = pathlib.Path(kernels.__file__).resolve().parent
assert hf.parent == site.parent and hf != site / "kernels", kernels.__file__  # Hugging Face's, in site-packages
print("fastpatch.kernels:", pathlib.Path(dispatch.__file__).parent, "| kernels:", kernels.__file__)

words = "the capital of peru is lima norway oslo river red what language spoken".split()
vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>"] + words)}
tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=113, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
ed = Editor(model, tok, EditorConfig(max_steps=300))
ed.build_memory(["the river of norway is red", "what language is spoken in peru"])
res = ed.edit(EditRequest("the capital of peru is", "lima", edit_id="peru"))
assert res.success and ed.check(["the capital of peru is"], ["lima"]) == [True], res
ed.rollback(res.edit_id)
assert ed.ffn.num_patches == 0
print(f"edit: success={res.success} steps={res.steps} neurons={res.n_neurons}; rolled back")
'''


def run(cmd: list[str], cwd: Path) -> None:
    """Run one command, echoing it; raise on failure."""
    shown = [c if "\n" not in c else "<script>" for c in cmd]
    print("+", " ".join(shown), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def main(argv: list[str] | None = None) -> int:
    """Build, install and exercise the wheel; return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fastpatch-wheel-"))
    try:
        # Build from a copy of the tree: setuptools builds in-tree, and a stale build/ would leak old files.
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".benchmarks", "results"))
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)], tmp)
        wheel = next((tmp / "dist").glob("fastpatch-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
        assert top == ["fastpatch"], f"the wheel installs top-level {top}, not only fastpatch"
        assert "fastpatch/kernels/fused_ffn.py" in names, "fastpatch/kernels/ missing from the wheel"
        print(f"wheel: {wheel.name}, {len(names)} files, top-level packages {top}")
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", str(venv)], tmp)
        py = str(venv / "bin" / "python")
        run([py, "-m", "pip", "install", "-q", "-c", str(LOCK), "torch==2.13.0"], tmp)
        run([py, "-m", "pip", "install", "-q", "-c", str(LOCK), str(wheel)], tmp)
        run([py, "-c", USER_SCRIPT], tmp)
        print("wheel-check: ok")
        return 0
    finally:
        if args.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
