"""RunOptions and its groups: flat names route to the right group, bad values are refused."""

from __future__ import annotations

import dataclasses

import pytest

from fastpatch.run import OutputOptions, RetainOptions, RunIdentity, RunOptions, ScoreOptions
from fastpatch.run.options import FLAT_FIELDS


def test_flat_names_reach_their_group() -> None:
    pairs = [("q", "a")]
    opts = RunOptions.create(protocol="easyedit", retain_size=7, min_retain=3, retain_pairs=pairs,
                             ability_texts=["t"], generation_metrics=False, plots=False, progress=False,
                             heatmap_max_edits=5, model_id="m", data_id={"d": 1}, run_info={"x": 2})
    assert opts.protocol == "easyedit"
    assert opts.retain == RetainOptions(pairs=pairs, size=7, min_right=3)
    assert opts.scores == ScoreOptions(ability_texts=["t"], generation=False)
    assert opts.output == OutputOptions(progress=False, plots=False, heatmap_max_edits=5, run_info={"x": 2})
    assert opts.identity == RunIdentity(model="m", data={"d": 1})


def test_every_flat_name_points_at_a_real_group_field() -> None:
    opts = RunOptions()
    for flat, (group, attr) in FLAT_FIELDS.items():
        assert attr in {f.name for f in dataclasses.fields(getattr(opts, group))}, flat


def test_replace_keeps_the_other_fields_of_a_group_and_applies_flat_names_over_a_given_group() -> None:
    base = RunOptions(retain=RetainOptions(size=9, min_right=4), eval_every=3)
    changed = base.replace(retain_size=2)
    assert changed.retain == RetainOptions(size=2, min_right=4)
    assert changed.eval_every == 3
    assert base.retain.size == 9  # the original is untouched
    both = base.replace(retain=RetainOptions(min_right=1), retain_size=5)
    assert both.retain == RetainOptions(size=5, min_right=1)


def test_unknown_names_and_bad_values_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="retain_sizes"):
        RunOptions().replace(retain_sizes=3)
    with pytest.raises(ValueError, match="protocol"):
        RunOptions(protocol="rome")
    with pytest.raises(ValueError, match="eval_every"):
        RunOptions.create(eval_every=-1)
    with pytest.raises(ValueError, match="checkpoint_every"):
        RunOptions(checkpoint_every=0)
    with pytest.raises(ValueError, match="batch_size"):
        RunOptions(batch_size=0)
    with pytest.raises(ValueError, match="min_retain"):
        RunOptions.create(min_retain=-2)
    with pytest.raises(ValueError, match="retain size"):
        RetainOptions(size=-1)


def test_checkpoint_interval_defaults_to_the_evaluation_cadence() -> None:
    assert RunOptions(eval_every=7).checkpoint_interval == 7
    assert RunOptions(eval_every=0).checkpoint_interval == 50
    assert RunOptions(eval_every=7, checkpoint_every=3).checkpoint_interval == 3


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunOptions().eval_every = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunOptions().retain.size = 2  # type: ignore[misc]
