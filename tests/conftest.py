"""Shared fixtures: a tiny synthetic dataset, a tiny trained run and its exports.

Everything is built once per session at 32 px so the whole suite stays within a
few minutes on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MRI_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY = 32


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from mri_edge.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), "tumor", n_train=10, n_test=4, size=64, seed=1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_run(synth_data, cache_dir, tmp_path_factory):
    """A finished run folder: 32 px DenseNet121 trained from scratch for 2 epochs."""
    from mri_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(task="tumor", data_dir=str(synth_data), out=str(out), weights="none", image_size=TINY,
                      batch_size=8, epochs_head=0, epochs_finetune=2, dense_units=16, patience=5,
                      cache_dir=str(cache_dir), eager=True)
    return train(cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def exported_run(tiny_run):
    """tiny_run with every export (`--format all`), converted by two worker processes."""
    from mri_edge.export import export_run

    results, failures = export_run(tiny_run, ("all",), (), "uint8", calib_size=16, log=lambda *_: None, workers=2)
    assert not failures, failures
    return tiny_run


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
