"""``EditorConfig.subject_context``: views with the subject mentioned before the prompt (the
original model's continuation of a seed that names it), so a subject key also learns the second
mention of a question restated in its answer (fastpatch.editor.views)."""

from __future__ import annotations

import pytest
import torch

from fastpatch.editor import EditError, EditorConfig, EditRequest
from fastpatch.editor.encoding import subject_last_token
from fastpatch.editor.types import ADDED_FIELDS, SUBJECT_SEEDS

from .test_deep_tail import _deep_editor

PROMPT = "the capital of peru is"


def test_subject_views_name_the_subject_twice_and_the_key_reads_the_prompts_mention() -> None:
    ed = _deep_editor(0, dtype=torch.float32, augment=1, augment_tokens=4, key_position="subject",
                      subject_context=2, max_steps=300)
    req = EditRequest(PROMPT, "lima", subject="peru")
    prefixes = ed.subject_prefixes(req)
    assert len(prefixes) == 2
    for seed, prefix in zip(SUBJECT_SEEDS, prefixes):
        assert prefix.startswith(seed.format(s="peru").rstrip(",")) and prefix.endswith(". ")
    batch = ed._prepare([req])
    texts = [v.prompt for v in batch.views]
    assert texts[0] == PROMPT and len(texts) == 1 + 1 + 2  # as given, one context variant, two subject views
    for text in texts[2:]:
        assert text.count("peru") >= 2 and text.endswith(PROMPT)
        # the key reads the last mention: the prompt's, not the prefix's
        pos = subject_last_token(ed.tokenizer, text, "peru")
        n_prompt = len(ed.tokenizer(PROMPT)["input_ids"])
        assert pos == len(ed.tokenizer(text)["input_ids"]) - n_prompt + 3
    res = ed.edit(req)
    assert res.success and ed.check([PROMPT], ["lima"]) == [True]


def test_subject_views_skip_requests_without_a_subject_and_the_requests_own_paraphrases() -> None:
    ed = _deep_editor(0, dtype=torch.float32, augment=0, key_position="subject", subject_context=1)
    assert ed.subject_prefixes(EditRequest(PROMPT, "lima")) == []
    req = EditRequest(PROMPT, "lima", subject="peru")
    (prefix,) = ed.subject_prefixes(req)
    own = EditRequest(PROMPT, "lima", subject="peru", rephrases=[prefix + PROMPT])
    assert ed._subject_views(own) == [] and len(ed._subject_views(req)) == 1
    # generation uses the original weights: the same prefix after an edit
    ed.edit(req)
    assert ed.subject_prefixes(req) == [prefix]


def test_subject_context_is_bounded_off_for_the_authors_and_for_older_configs() -> None:
    with pytest.raises(EditError, match="subject_context"):
        EditorConfig(subject_context=len(SUBJECT_SEEDS) + 1)
    with pytest.raises(EditError, match="subject_context"):
        EditorConfig(subject_context=-1)
    assert EditorConfig.authors().subject_context == 0
    assert ADDED_FIELDS["subject_context"] == 0
    old = {k: v for k, v in EditorConfig().to_dict().items() if k != "subject_context"}
    assert EditorConfig.from_dict(old).subject_context == 0
