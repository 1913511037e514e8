"""Figures: files are written and readable; the decision grid is the classifier's argmax; bad shapes
raise clear errors."""
import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxrobust import plots

W = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], np.float32)
linear3 = lambda p: np.asarray(p) @ W


def _png_ok(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # not a blank canvas


def test_all_figures_are_written(tmp_path):
    e = np.linspace(0.01, 0.2, 10)
    _png_ok(plots.plot_certified_vs_eps(e, np.minimum(e, 0.08), np.where(e < 0.05, e, 0), tmp_path / "a" / "f36.png"))
    imgs = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
    _png_ok(plots.plot_bounding_maps(imgs, [imgs * 0.1, imgs * 0.2], tmp_path / "f35.png",
                                     col_titles=["x", "u", "n"]))
    _png_ok(plots.plot_radius_distribution({"a": np.random.rand(50), "b": np.random.rand(50)},
                                           tmp_path / "f39.png", eps=0.5))
    pts = np.random.default_rng(1).uniform(-1, 1, (5, 2))
    for norm in ("linf", "l2", "l1"):
        _png_ok(plots.plot_synthetic_regions(linear3, pts, np.argmax(linear3(pts), -1), np.full(5, 0.05),
                                             np.full((5, 2), 0.07), tmp_path / f"f33_{norm}.png", grid=60,
                                             norm=norm))
    _png_ok(plots.plot_cosine_similarity(np.random.rand(6, 4, 4, 1), tmp_path / "cos.png"))


def test_decision_grid_is_argmax():
    xs, ys, lab = plots.decision_grid(linear3, (-1.0, 1.0), 50)
    X, Y = np.meshgrid(xs, ys)
    np.testing.assert_array_equal(lab, np.argmax(linear3(np.stack([X, Y], -1).reshape(-1, 2)), -1).reshape(50, 50))
    assert len(np.unique(lab)) == 3


def test_bad_shapes(tmp_path):
    pts = np.zeros((4, 2))
    with pytest.raises(ValueError, match="nonuniform_eps"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(4), np.zeros(4), np.zeros((4, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="uniform_eps"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(4), np.zeros(3), np.zeros((4, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="one value per"):
        plots.plot_certified_vs_eps(np.zeros(3), np.zeros(2), np.zeros(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_bounding_maps(np.zeros((2, 4, 4, 1)), [np.zeros((2, 4, 4, 3))], tmp_path / "x.png")
