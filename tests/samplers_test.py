"""Tests of supcon_tf.data.samplers: balanced, reproducible, sharded batches."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf.data import samplers

# 7 classes of very different sizes; class 5 has 1 image, class 6 has 2.
_COUNTS = [10, 7, 4, 30, 3, 1, 2]
_LABELS = np.random.default_rng(0).permutation(
    np.repeat(np.arange(7), _COUNTS)).astype(np.int32)


def _batch(step, batch=12, m=3, seed=5, labels=_LABELS):
  return samplers.balanced_indices(labels, batch, m, seed, step).numpy()


def test_m_per_class_and_distinct_classes():
  for step in range(20):
    idx = _batch(step)
    assert idx.shape == (12,) and idx.dtype == np.int64
    groups = _LABELS[idx].reshape(4, 3)
    # Class-major layout: each group of M is one class, 4 distinct classes.
    assert (groups == groups[:, :1]).all()
    assert len(set(groups[:, 0])) == 4
    assert collections.Counter(_LABELS[idx]).most_common(1)[0][1] == 3


def test_distinct_images_when_class_is_large_enough():
  for step in range(30):
    idx = _batch(step).reshape(4, 3)
    for group in idx:
      if _COUNTS[_LABELS[group[0]]] >= 3:
        assert len(set(group)) == 3, (step, group)


def test_small_classes_sampled_with_replacement():
  # Only 2 classes exist so both are drawn each step; class 0 has 1 image.
  labels = np.array([0, 1, 1, 1, 1, 1])
  idx = samplers.balanced_indices(labels, 8, 4, 0, 3).numpy()
  by_class = {labels[g[0]]: g for g in idx.reshape(2, 4)}
  np.testing.assert_array_equal(by_class[0], [0, 0, 0, 0])
  assert set(by_class[1]) <= {1, 2, 3, 4, 5} and len(set(by_class[1])) == 4


def test_uniform_over_classes_and_images():
  counts = collections.Counter()
  image_counts = collections.Counter()
  steps = 300
  for step in range(steps):
    idx = _batch(step)
    counts.update(set(_LABELS[idx]))
    image_counts.update(idx[_LABELS[idx] == 3])
  # Each class is in 4/7 of the batches; each class-3 image drawn 3/30 of them.
  for c in range(7):
    assert abs(counts[c] / steps - 4 / 7) < 0.1, c
  per_image = np.array([image_counts[i] for i in np.flatnonzero(_LABELS == 3)])
  expected = counts[3] * 3 / 30
  assert np.all(np.abs(per_image - expected) < 0.6 * expected)


def test_deterministic_per_seed_and_step():
  a = _batch(7)
  np.testing.assert_array_equal(a, _batch(7))
  assert not np.array_equal(a, _batch(8))
  assert not np.array_equal(a, _batch(7, seed=6))
  different = sum(not np.array_equal(_batch(s), _batch(s + 1))
                  for s in range(10))
  assert different == 10


def test_dataset_resume_and_static_shapes():
  ds = samplers.balanced_index_dataset(_LABELS, 12, 3, seed=5)
  assert ds.element_spec.shape.as_list() == [12]
  assert ds.element_spec.dtype == tf.int64
  full = [x.numpy() for x in ds.take(6)]
  resumed = samplers.balanced_index_dataset(_LABELS, 12, 3, seed=5,
                                            start_step=4)
  np.testing.assert_array_equal(np.stack([x.numpy() for x in resumed.take(2)]),
                                np.stack(full[4:6]))
  for step, batch in enumerate(full):
    np.testing.assert_array_equal(batch, _batch(step))


def test_host_shards_union_is_global_batch():
  hosts = 3
  shards = [
      samplers.balanced_index_dataset(_LABELS, 12, 2, seed=1, start_step=2,
                                      num_input_pipelines=hosts,
                                      input_pipeline_id=i)
      for i in range(hosts)
  ]
  for ds in shards:
    assert ds.element_spec.shape.as_list() == [4]
  per_host = [[x.numpy() for x in ds.take(3)] for ds in shards]
  for k in range(3):
    union = np.concatenate([per_host[i][k] for i in range(hosts)])
    np.testing.assert_array_equal(
        union, samplers.balanced_indices(_LABELS, 12, 2, 1, 2 + k).numpy())


def test_works_inside_a_tf_function():
  table = samplers.class_table(_LABELS)
  fn = tf.function(lambda s: samplers.balanced_batch(table, 12, 3, 5, s))
  np.testing.assert_array_equal(fn(tf.constant(3, tf.int64)).numpy(),
                                _batch(3))


@pytest.mark.parametrize('batch, m, hosts, match', [
    (12, 1, 1, '--samples_per_class'),
    (13, 3, 1, '--batch_size.*--samples_per_class'),
    (24, 3, 1, r'--batch_size / --samples_per_class = 24 / 3 = 8 classes'),
    (12, 3, 5, '--batch_size.*input pipelines'),
])
def test_bad_arguments_name_the_flags(batch, m, hosts, match):
  with pytest.raises(ValueError, match=match):
    samplers.balanced_index_dataset(_LABELS, batch, m, 0,
                                    num_input_pipelines=hosts)


def test_bad_labels():
  with pytest.raises(ValueError, match='>= 0'):
    samplers.class_table(np.array([0, -1, 1]))
  with pytest.raises(ValueError, match='1-D'):
    samplers.class_table(np.zeros((2, 2), int))


def test_floyd_subsets_are_uniform():
  # n = 4, M = 3: each of the 4 subsets with probability 1/4; n = M = 3:
  # always all three; n = 2 < M: with replacement, values in [0, 2).
  trials = 4000
  counts = tf.constant([4] * trials + [3, 2], tf.int64)
  key = tf.constant([1, 2], tf.int64)
  pos = samplers.within_class_positions(counts, 3, key).numpy()
  subsets = collections.Counter(frozenset(p) for p in pos[:trials])
  assert all(len(s) == 3 for s in subsets)
  assert len(subsets) == 4
  for s, c in subsets.items():
    assert abs(c / trials - 0.25) < 0.03, (s, c)
  assert sorted(pos[trials]) == [0, 1, 2]
  assert set(pos[trials + 1]) <= {0, 1}
