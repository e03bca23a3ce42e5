"""The main job's settings: presets and how many variants are built at once."""

import dataclasses
import os

import pytest

from jaxopt_lab.app.report.settings import VARIANTS, JobSettings


def test_quick_preset_is_smaller_than_the_default():
    quick, default = JobSettings.preset(quick=True), JobSettings.preset()
    assert quick.quick and not default.quick
    for field in ("teacher_epochs", "finetune_epochs", "prune_epochs", "student_epochs",
                  "pipeline_epochs", "latency_repeats"):
        assert getattr(quick, field) <= getattr(default, field), field


def test_overrides_win_over_the_preset():
    s = JobSettings.preset(quick=True, seed=7, teacher_epochs=1)
    assert (s.seed, s.teacher_epochs, s.quick) == (7, 1, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3


@pytest.mark.parametrize("workers, devices, expected", [
    (None, 2, 1), (3, None, 3), (0, None, 1), (1, 4, 1)])
def test_build_workers(workers, devices, expected):
    assert JobSettings(workers=workers, devices=devices).build_workers() == expected


def test_default_workers_follow_the_cores():
    n = JobSettings().build_workers()
    assert 1 <= n <= min(4, os.cpu_count() or 1)


def test_variant_names_are_unique_and_start_with_the_baseline():
    assert VARIANTS[0] == "baseline" and len(set(VARIANTS)) == len(VARIANTS)
