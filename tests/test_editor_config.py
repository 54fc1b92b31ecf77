"""EditorConfig: the method's settings and the runtime options, old saved configs, the authors'
setup, and the documented fallback of the gradient value init off the fast path."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fastpatch.editor import Editor, EditorConfig, MethodSettings, RuntimeOptions
from fastpatch.editor.init import VALUE_INITS, GradientValue, UnembedValue, value_init_for

from .test_editor import word_tokenizer
from .tiny_models import TINY


def test_config_is_the_method_plus_the_runtime() -> None:
    names = {f.name for f in dataclasses.fields(EditorConfig)}
    method = {f.name for f in dataclasses.fields(MethodSettings)}
    runtime = {f.name for f in dataclasses.fields(RuntimeOptions)}
    assert names == method | runtime and not method & runtime
    assert {"fast_path", "loss_vocab", "memory_cap", "keep_failed"} == runtime
    cfg = EditorConfig(max_steps=7, fast_path=False)
    assert cfg.method.max_steps == 7 and cfg.runtime.fast_path is False
    assert "check_every" not in names  # declared once, never read: gone


def test_old_saved_configs_load() -> None:
    saved = {**EditorConfig().to_dict(), "check_every": 1}
    assert EditorConfig.from_dict(saved) == EditorConfig()
    with pytest.raises(TypeError):
        EditorConfig.from_dict({**saved, "no_such_field": 1})
    # a config saved before the phrasing views existed resumes without them, whatever the default
    older = {k: v for k, v in EditorConfig(phrasings=4, negative_views=True).to_dict().items()
             if k not in ("phrasings", "negative_views")}
    back = EditorConfig.from_dict(older)
    assert (back.phrasings, back.negative_views) == (0, False)
    assert EditorConfig.from_dict(EditorConfig(phrasings=4).to_dict()).phrasings == 4


def test_authors_turns_seven_defaults_off() -> None:
    ours, theirs = EditorConfig(), EditorConfig.authors()
    changed = {f.name for f in dataclasses.fields(EditorConfig) if getattr(ours, f.name) != getattr(theirs, f.name)}
    assert changed == {"init", "value_init", "augment", "loss_vocab", "max_neurons", "negatives", "phrasings"}
    assert (theirs.negatives, theirs.negative_whiten, theirs.memory_growth) == (0, 0.0, "all")


def test_gradient_value_init_off_the_fast_path_is_unembed_and_said(caplog) -> None:
    fast = Editor(TINY["llama"][0](), word_tokenizer(), EditorConfig())
    assert isinstance(value_init_for(fast.handle, fast.config), GradientValue)
    assert value_init_for(fast.handle, fast.config).searches_amplifier
    with caplog.at_level(logging.INFO, logger="fastpatch.editor"):
        slow = Editor(TINY["llama"][0](), word_tokenizer(), EditorConfig(fast_path=False))
    assert "value_init='gradient' needs the fast path" in caplog.text
    chosen = value_init_for(slow.handle, slow.config)
    assert isinstance(chosen, UnembedValue) and not isinstance(chosen, GradientValue)
    assert not chosen.searches_amplifier
    assert value_init_for(slow.handle, EditorConfig(value_init="random", fast_path=False)) is VALUE_INITS["random"]
