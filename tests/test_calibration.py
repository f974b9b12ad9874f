import numpy as np
import pytest

from qdeploy.calibration import (EntropyObserver, HistogramObserver, MinMaxObserver, MovingAverageObserver,
                                 MSEObserver, PercentileObserver, collect_ranges, open_data, select)
from qdeploy.errors import DataError
from qdeploy.model import load_model
from qdeploy.spec import ActivationSpec, CalibrationSpec


def _feed(obs, batches):
    for b in batches:
        obs.update(b)
    return obs.range()


def _heavy_tailed(seed=0, n=20, size=4096):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    out[3][0] = 60.0  # one outlier
    return out


def test_minmax_is_exact():
    batches = _heavy_tailed()
    lo, hi = _feed(MinMaxObserver(), batches)
    allx = np.concatenate(batches)
    assert lo == allx.min() and hi == allx.max() == 60.0


def test_moving_average_follows_its_formula():
    obs = MovingAverageObserver(0.5)
    for b in ([0.0, 1.0], [-2.0, 3.0]):
        obs.update(np.array(b))
    assert obs.range() == (-1.0, 2.0)


def test_histogram_doubling_keeps_every_count_and_matches_one_pass():
    batches = _heavy_tailed()
    streamed = HistogramObserver()
    _feed(streamed, batches)
    one = HistogramObserver()
    one.update(np.concatenate(batches))
    assert streamed.hist.sum() == sum(b.size for b in batches)
    assert streamed.radius == one.radius
    np.testing.assert_allclose(streamed.hist, one.hist)


@pytest.mark.parametrize("obs", [PercentileObserver(99.9), EntropyObserver()], ids=["percentile", "entropy"])
def test_clipping_observers_ignore_a_lone_outlier(obs):
    lo, hi = _feed(obs, _heavy_tailed())
    assert 2.0 < hi < 30.0, hi  # far inside the outlier at 60, still covering the bulk (sigma 1)
    assert lo < -2.0


def test_mse_clips_a_heavy_tail_and_beats_minmax_error():
    rng = np.random.default_rng(0)
    batches = [rng.laplace(size=8192).astype(np.float32) for _ in range(10)]
    obs = MSEObserver(symmetric=False)
    lo, hi = _feed(obs, batches)
    allx = np.concatenate(batches)
    assert hi < allx.max() * 0.9 and lo > allx.min() * 0.9

    def err(lo, hi):
        scale = (hi - lo) / 255
        zp = np.round(-lo / scale)
        return np.mean((allx - (np.clip(np.round(allx / scale) + zp, 0, 255) - zp) * scale) ** 2)
    assert err(lo, hi) < err(allx.min(), allx.max())


def test_percentile_is_close_to_numpy_quantile():
    batches = _heavy_tailed()
    lo, hi = _feed(PercentileObserver(99.0), batches)
    allx = np.concatenate(batches)
    assert abs(hi - np.quantile(allx, 0.99)) < 0.1 and abs(lo - np.quantile(allx, 0.01)) < 0.1


def test_observers_disagree_where_they_should():
    """Calibrators are tested against each other, not trusted by name."""
    ranges = {name: _feed(obs, _heavy_tailed()) for name, obs in
              [("minmax", MinMaxObserver()), ("percentile", PercentileObserver(99.99)),
               ("entropy", EntropyObserver()), ("mse", MSEObserver(False))]}
    assert len({round(r[1], 3) for r in ranges.values()}) == 4, ranges


def test_non_negative_tensors_keep_zero_as_low_end():
    rng = np.random.default_rng(0)
    relu = [np.maximum(rng.standard_normal(2048), 0) for _ in range(5)]
    for obs in (PercentileObserver(99.9), EntropyObserver(), MSEObserver(False)):
        lo, hi = _feed(obs, relu)
        assert lo == 0.0 and hi > 1.0


def test_balanced_selection():
    labels = np.repeat(np.arange(10), [100, 5, 100, 100, 100, 100, 100, 100, 100, 100])
    idx = select(len(labels), CalibrationSpec(samples=300, seed=0), labels)
    counts = np.bincount(labels[idx], minlength=10)
    assert len(idx) == 300 and counts[1] == 5 and counts.max() - counts[counts != 5].min() <= 1
    assert np.array_equal(idx, select(len(labels), CalibrationSpec(samples=300, seed=0), labels))


# --- data sources and their errors -------------------------------------------------------------------------
@pytest.fixture
def mlp_handle(mlp_onnx, tmp_path):
    return load_model(mlp_onnx, tmp_path / "ref.onnx")


def test_folder_npz_iterable_and_arrays_give_the_same_samples(mlp_handle, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(0, 50, 10):
        np.save(folder / f"part{i:03d}.npy", x[i:i + 10])
    np.savez(tmp_path / "c.npz", anything=x)
    sources = [folder, tmp_path / "c.npz", x, {"x": x}, (x[i:i + 7] for i in range(0, 50, 7))]
    for src in sources:
        ds = open_data(src, mlp_handle, "calibration")
        got, _ = ds.arrays()
        np.testing.assert_array_equal(got["x"], x)
        assert ds.count == 50
        np.testing.assert_array_equal(ds.arrays()[0]["x"], x)  # a second pass gives the same data


def test_batches_are_bounded(mlp_handle):
    x = np.zeros((100, 16), np.float32)
    ds = open_data(x, mlp_handle, "calibration", CalibrationSpec(samples=100, batch_size=16))
    sizes = [len(b[0]["x"]) for b in ds.batches()]
    assert max(sizes) == 16 and sum(sizes) == 100


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "holds no .npy or .npz files"),
    (lambda d: d / "missing.npz", "does not exist"),
    (lambda d: np.savez(d / "e.npz", x=np.zeros((0, 16), np.float32)) or d / "e.npz", "no samples"),
    (lambda d: np.savez(d / "s.npz", x=np.zeros((5, 15), np.float32)) or d / "s.npz", "has samples of shape 15"),
    (lambda d: np.savez(d / "n.npz", x=np.full((5, 16), np.nan, np.float32)) or d / "n.npz", "NaN or Inf"),
    (lambda d: np.savez(d / "t.npz", a=np.zeros((5, 16)), b=np.zeros((5, 16))) or d / "t.npz", "give one array"),
    (lambda d: np.savez(d / "y.npz", x=np.zeros((5, 16)), y=np.zeros(4, np.int64)) or d / "y.npz", "4 labels for 5 samples"),
])
def test_bad_data_gets_one_clear_error(mlp_handle, tmp_path, make, message):
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(DataError, match=message):
        open_data(make(d), mlp_handle, "calibration")


def test_collect_ranges_covers_every_activation(mlp_handle, mlp_data):
    ds = open_data(mlp_data, mlp_handle, "calibration", CalibrationSpec(samples=100))
    ranges = collect_ranges(mlp_handle, ds, ActivationSpec(method="percentile"))
    assert set(ranges.ranges) == {"x", "h0", "h1", "h2", "y"} and ranges.samples == 100
    assert ranges.get("h2")[0] >= 0.0  # after Relu


def test_batches_never_exceed_the_batch_size_across_chunks(mlp_handle):
    chunks = [np.zeros((20, 16), np.float32) for _ in range(3)]
    ds = open_data(iter(chunks), mlp_handle, "calibration", CalibrationSpec(samples=60, batch_size=32))
    assert [len(b[0]["x"]) for b in ds.batches()] == [32, 28]


def test_folder_labels_follow_natural_file_order(mlp_handle, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(12):  # s0 .. s11: text order would put s10 and s11 before s2
        np.save(folder / f"s{i}.npy", np.full((1, 16), i, np.float32))
    np.save(folder / "y.npy", np.arange(12))
    x, y = open_data(folder, mlp_handle, "validation").arrays()
    assert np.array_equal(x["x"][:, 0], y.astype(np.float32))


@pytest.mark.parametrize("labels, message", [(np.zeros(100, np.int64), "100 labels for 1000 samples"),
                                             (np.eye(10)[np.zeros(1000, int)], "integer class indices")])
def test_bad_labels_are_refused_before_sampling(mlp_handle, tmp_path, labels, message):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((1000, 16), np.float32), y=labels)
    with pytest.raises(DataError, match=message):
        open_data(path, mlp_handle, "calibration", CalibrationSpec(samples=300))


def test_cosine_of_a_zero_reference_and_a_nonzero_output_is_zero():
    from qdeploy.verify import output_metrics

    ref = np.zeros((2, 4), np.float32)
    assert output_metrics(ref, ref)["cosine"] == 1.0
    assert output_metrics(ref, np.ones((2, 4), np.float32))["cosine"] == 0.0


def test_entropy_is_not_dragged_inside_the_data_by_relu_zeros():
    """Most of a ReLU6 output is exactly 0: that spike must not decide the KL threshold (it used to clip a
    90%-zeros ReLU6 distribution at 1.0 of 6; EfficientNet-Lite0 then lost every top-1)."""
    from qdeploy.calibration import EntropyObserver

    rng = np.random.default_rng(0)
    x = np.clip(np.abs(rng.normal(0, 2, 200_000)), 0, 6)
    x[:2_000] = 6.0
    x[2_000:182_000] = 0.0
    obs = EntropyObserver()
    obs.update(x.astype(np.float32))
    lo, hi = obs.range()
    assert lo == 0.0 and hi >= 4.0
    g = EntropyObserver()
    g.update(rng.normal(0, 1, 200_000).astype(np.float32))
    lo, hi = g.range()
    assert 3.0 <= -lo <= 5.0 and 3.0 <= hi <= 5.0  # a Gaussian is clipped a few sigma out, not at its extremes
