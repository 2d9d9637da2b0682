"""feed.for_fit: the tf.data pipeline that `fit` gets gives exactly the PyDataset's batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mri_edge.feed import for_fit, make_batches

IMAGES = np.arange(22, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
LABELS = np.arange(22) % 4
WEIGHTS = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}


def _elements(ds):
    return [tuple(np.asarray(t) for t in element) for element in ds]


def _several_workers(replicas: int, workers: int):
    """A Distribution as for_fit reads it, with a strategy that hands back the worker's own dataset."""
    strategy = SimpleNamespace(distribute_datasets_from_function=lambda fn: fn(None))
    return SimpleNamespace(strategy=strategy, multi_worker=True, replicas=replicas, workers=workers)


@pytest.mark.parametrize("weights, drop_last", [(None, False), (WEIGHTS, False), (None, True)])
def test_the_graph_pipeline_gives_the_batches_of_each_epoch_in_their_order(weights, drop_last):
    batches = make_batches(IMAGES, LABELS, 4, 8, shuffle=True, seed=3, sample_weights=weights, drop_last=drop_last)
    ds = for_fit(batches)
    assert ds is not batches and not batches.needs_python
    for epoch in (0, 1, 0, 5):  # set_epoch as callbacks.EpochOrder calls it before each epoch
        batches.set_epoch(epoch)
        for _ in range(2):  # every iteration starts again from the epoch's first batch
            got = _elements(ds)
            assert len(got) == len(batches) == (2 if drop_last else 3)  # 22 images: 8 + 8 (+ 6)
            for i, element in enumerate(got):
                assert element[0].dtype == np.float32 and len(element) == (2 if weights is None else 3)
                assert len(element[0]) == (8 if drop_last or i < 2 else 6)
                for a, b in zip(element, batches[i]):
                    np.testing.assert_array_equal(a, b)
    batches.set_epoch(0)
    first = _elements(ds)[0][0]
    batches.set_epoch(1)
    assert not np.array_equal(_elements(ds)[0][0], first)  # a new order, not a replay


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_each_worker_gets_its_part_of_every_global_batch_cut_per_local_replica(mixup):
    whole = make_batches(IMAGES, LABELS, 4, 8, shuffle=True, seed=3, sample_weights=WEIGHTS, mixup=mixup)
    whole.set_epoch(2)
    for k in range(2):
        part = make_batches(IMAGES, LABELS, 4, 8, shuffle=True, seed=3, sample_weights=WEIGHTS, mixup=mixup,
                            shard=(k, 2))
        ds = for_fit(part, _several_workers(replicas=4, workers=2))  # 2 replicas on each worker
        part.set_epoch(2)
        got = _elements(ds)
        assert len(got) == 2 * len(whole)
        for i in range(len(whole)):
            mine = [np.array_split(a, 2)[k] for a in whole[i]]  # this worker's part of the global batch
            for j in range(3):  # images, labels and sample weights (blended alike with mixup)
                np.testing.assert_array_equal(np.concatenate([got[2 * i][j], got[2 * i + 1][j]]), mine[j])


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.3, 1.0)])
def test_the_graph_pipeline_blends_as_the_pydataset_does(mixup, cutmix):
    images = np.random.default_rng(0).integers(0, 256, (22, 6, 6, 3), dtype=np.uint8)
    batches = make_batches(images, LABELS, 4, 8, shuffle=True, seed=3, sample_weights=WEIGHTS, mixup=mixup,
                           cutmix=cutmix)
    ds = for_fit(batches)
    assert ds is not batches
    boxes = set()
    for epoch in (0, 1, 4):
        batches.set_epoch(epoch)
        got = _elements(ds)
        assert len(got) == len(batches)
        for i, element in enumerate(got):
            boxes.add(batches.indices(i)[3] is not None)
            for a, b in zip(element, batches[i]):  # images, labels and weights, blended alike
                np.testing.assert_array_equal(a, b)
    assert boxes == {mixup <= 0, cutmix > 0}  # both kinds of batch seen when both are on


def test_batches_that_need_python_per_batch_stay_a_pydataset_without_a_strategy():
    def teacher(x):  # a teacher's answers are computed in Python, per batch
        return np.full((len(x), 4), 0.25, np.float32)

    taught = make_batches(IMAGES, LABELS, 4, 8, shuffle=True, seed=3, mixup=0.4, teacher=teacher, distill_weight=0.5)
    assert taught.needs_python and for_fit(taught) is taught
    ds = for_fit(taught, _several_workers(replicas=2, workers=2))  # under a strategy: a generator pipeline
    got = _elements(ds)
    assert len(got) == len(taught)
    for i, element in enumerate(got):
        for a, b in zip(element, taught[i]):
            np.testing.assert_allclose(a, b)
