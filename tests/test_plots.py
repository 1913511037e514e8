"""Figures: files are written and readable; the decision grid is the classifier's argmax and matches
known linear regions; bad inputs raise clear errors."""
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxrobust import plots
from jaxrobust.certify.nonuniform import cosine_similarity_stats

W = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], np.float32)
linear3 = lambda p: np.asarray(p) @ W


def _png_ok(path):
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # not a blank canvas
    return img


def test_all_figures_are_written(tmp_path):
    e = np.linspace(0.01, 0.2, 10)
    out = plots.plot_certified_vs_eps(e, np.minimum(e, 0.08), np.where(e < 0.05, e, 0), tmp_path / "a" / "f36.png",
                                      title="input 0", norm="l2")
    assert (tmp_path / "a" / "f36.png").stat().st_size > 0 and str(out).endswith("f36.png")
    _png_ok(out)
    imgs = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
    _png_ok(plots.plot_bounding_maps(imgs, [imgs * 0.1, imgs * 0.2], tmp_path / "f35.png",
                                     row_titles=["1", "7"], col_titles=["x", "u", "n"]))
    rgb = np.random.default_rng(1).uniform(-1, 1, size=(3, 6, 6, 3))  # [-1, 1] inputs, C=3 maps averaged
    _png_ok(plots.plot_bounding_maps(rgb, [np.abs(rgb)], tmp_path / "f35_rgb.png"))
    _png_ok(plots.plot_radius_distribution({"a": np.random.rand(50), "b": jnp.asarray(np.random.rand(50))},
                                           tmp_path / "f39.png", eps=0.5))
    _png_ok(plots.plot_radius_distribution({"zeros": np.zeros(5)}, tmp_path / "f39_zero.png"))
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


def test_decision_grid_known_regions():
    """logits (x, y, 0): class 0 where x > max(y, 0), class 1 where y > max(x, 0), class 2 in x, y < 0.
    Rows are y and columns x (so the figure is not transposed), also on a non-symmetric box and with a
    jax function, evaluated in chunks."""
    fn = lambda p: jnp.stack([p[:, 0], p[:, 1], jnp.zeros(p.shape[0])], -1)
    xs, ys, lab = plots.decision_grid(fn, (-1.0, 3.0), 41, chunk=100)
    X, Y = np.meshgrid(xs, ys)
    want = np.where((X > Y) & (X > 0), 0, np.where((Y > X) & (Y > 0), 1, 2))
    clear = (np.abs(X - Y) > 1e-6) & (np.abs(X) > 1e-6) & (np.abs(Y) > 1e-6)
    np.testing.assert_array_equal(lab[clear], want[clear])
    assert lab[0, -1] == 0 and lab[-1, 0] == 1 and lab[0, 0] == 2  # (x=3, y=-1), (x=-1, y=3), (-1, -1)


def test_cosine_figure_matches_table_statistics(tmp_path):
    maps = np.random.default_rng(2).uniform(size=(7, 3, 3, 1))
    mean, mn = cosine_similarity_stats(jnp.asarray(maps))
    v = maps.reshape(7, -1)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = (u @ u.T)[np.triu_indices(7, 1)]
    assert abs(s.mean() - mean) < 1e-5 and abs(s.min() - mn) < 1e-5
    _png_ok(plots.plot_cosine_similarity(maps, tmp_path / "cos.png"))


def test_bad_inputs(tmp_path):
    pts = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"nonuniform_eps must be \(N, 2\)"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(4), np.zeros(4), np.zeros((4, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="uniform_eps must have one radius per point"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(4), np.zeros(3), np.zeros((4, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="points must be"):
        plots.plot_synthetic_regions(linear3, np.zeros((4, 3)), np.zeros(4), np.zeros(4), np.zeros((4, 2)),
                                     tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels must have one label per point"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(3), np.zeros(4), np.zeros((4, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="Unknown norm"):
        plots.plot_synthetic_regions(linear3, pts, np.zeros(4), np.zeros(4), np.zeros((4, 2)), tmp_path / "x.png",
                                     norm="l3")
    with pytest.raises(ValueError, match="logits_fn must map"):
        plots.decision_grid(lambda p: np.zeros(len(p)), (-1.0, 1.0), 5)
    with pytest.raises(ValueError, match="one value per"):
        plots.plot_certified_vs_eps(np.zeros(3), np.zeros(2), np.zeros(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_bounding_maps(np.zeros((2, 4, 4, 1)), [np.zeros((2, 4, 4, 3))], tmp_path / "x.png")
    with pytest.raises(ValueError, match="col_titles must have 3"):
        plots.plot_bounding_maps(np.zeros((2, 4, 4, 1)), [np.zeros((2, 4, 4, 1))] * 2, tmp_path / "x.png",
                                 col_titles=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_radius_distribution({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="N >= 2"):
        plots.plot_cosine_similarity(np.zeros((1, 4)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _capture(monkeypatch):
    """Keeps the figure and its rendered pixels (RGB, rows top-down) when a plot function saves."""
    got = {}
    orig = plots._save

    def save(fig, path):
        fig.canvas.draw()
        got["fig"], got["img"] = fig, np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int).copy()
        return orig(fig, path)
    monkeypatch.setattr(plots, "_save", save)
    return got


def _pixels_of(img, ax, color, exclude=()):
    """Pixels inside ``ax`` (outside the ``exclude`` artists, e.g. the legend) of ``color``."""
    from matplotlib.colors import to_rgb
    rgb = np.array(to_rgb(color)) * 255
    h = img.shape[0]
    mask = np.zeros(img.shape[:2], bool)
    b = ax.get_window_extent()
    mask[int(h - b.y1):int(h - b.y0), int(b.x0):int(b.x1)] = True
    for art in exclude:
        e = art.get_window_extent()
        mask[int(h - e.y1) - 2:int(h - e.y0) + 2, int(e.x0) - 2:int(e.x1) + 2] = False
    return int(np.sum(mask & (np.abs(img - rgb).max(-1) < 40)))


def test_fig3_9_target_in_legend_and_coinciding_curves_visible(tmp_path, monkeypatch):
    """Alg 3.5 and binary search often find the same radii: both curves must show (the first used to
    be painted over), and the target ε line has a legend entry on both panels."""
    got = _capture(monkeypatch)
    r = np.random.default_rng(3).uniform(0, 0.06, 200)
    plots.plot_radius_distribution({"Alg 3.5 (PEC)": r, "binary search": r.copy()}, tmp_path / "f39.png", eps=0.03)
    a1, a2 = got["fig"].axes
    for a in (a1, a2):
        assert "target ε = 0.03" in [t.get_text() for t in a.get_legend().get_texts()]
    lines = {ln.get_label(): ln for ln in a2.get_lines()}
    alg, bs = lines["Alg 3.5 (PEC)"], lines["binary search"]
    assert (alg.get_color(), alg.get_linestyle(), alg.get_marker()) != (bs.get_color(), bs.get_linestyle(),
                                                                       bs.get_marker())
    for ln in (alg, bs):  # each identical curve has plenty of its own colour on the plot, not just the legend
        assert _pixels_of(got["img"], a2, ln.get_color(), exclude=[a2.get_legend()]) > 300, ln.get_label()
