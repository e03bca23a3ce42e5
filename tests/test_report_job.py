"""The job: variant selection, data loading, and a small run on user data (Dense models)."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.app.report import VARIANTS, JobSettings, run_job, select_variants
from jaxopt_lab.app.report.job import load_data


@given(st.lists(st.sampled_from(VARIANTS), min_size=1, max_size=6))
def test_select_variants_keeps_report_order_and_the_baseline(names):
    for only in (",".join(names), names, " , ".join(names)):
        chosen = select_variants(only)
        assert chosen[0] == "baseline" and set(chosen) == {"baseline", *names}
        assert list(chosen) == [v for v in VARIANTS if v in chosen]
    assert select_variants(None) == VARIANTS


@pytest.mark.parametrize("only", ["", "int8_ptq,,nm24", "INT8_PTQ", "int8"])
def test_select_variants_rejects_bad_names(only):
    with pytest.raises(ValueError):
        select_variants(only)


def test_load_data_gives_3d_images_a_channel_and_checks_split_sizes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, x=rng.random((60, 5, 5)), y=np.arange(60) % 3)
    data, name = load_data(str(path), 0)
    assert name == "img.npz" and data.train.x.shape[1:] == (5, 5, 1) and data.num_classes == 3
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=rng.random((3, 4)), y=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="too few examples"):
        load_data(str(tiny), 0)


def test_digits_by_default():
    data, name = load_data(None, 1)
    assert "digits" in name and data.train.x.shape[1:] == (8, 8, 1) and data.num_classes == 10


def test_small_run_on_user_data(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 12)) * 3
    y = np.arange(240) % 3
    x = (centers[y] + rng.normal(size=(240, 12))).astype(np.float32)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    settings = JobSettings.preset(quick=True, teacher_epochs=2, finetune_epochs=1,
                                  student_epochs=2, pipeline_epochs=1, latency_repeats=2,
                                  progress=False)
    report = run_job(settings, out=str(tmp_path / "r"), data_path=str(path),
                     only="bn_folded,channel_compact,int8_ptq")
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["baseline", "bn_folded", "int8_ptq", "channel_compact"]
    assert report["data"]["models"] == "dense" and report["data"]["input_shape"] == [12]
    assert rows["baseline"]["accuracy"] > 0.8
    assert rows["bn_folded"]["accuracy"] == pytest.approx(rows["baseline"]["accuracy"], abs=0.02)
    assert rows["channel_compact"]["params"] < rows["baseline"]["params"]
    assert rows["int8_ptq"]["size_bytes"] < rows["baseline"]["size_bytes"] / 3
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["name"] for r in on_disk["variants"]] == list(rows)
