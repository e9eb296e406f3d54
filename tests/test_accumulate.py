"""CKAAccumulator: minibatch CKA against the NumPy reference, convergence, merging, and 2 gloo processes."""

import math

import cka_reference as ref
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cka_scale import CKAAccumulator, DegenerateCKAWarning, ToolkitError, cka_matrix, gram


def make_batches(num_batches, batch, seed=0):
    """Batches of 3 related entries with different shapes (a (b, 6) layer, a (b, 2, 3, 3) map, a (b, 4) layer)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(6, 18, generator=g), torch.randn(18, 4, generator=g)
    out = []
    for _ in range(num_batches):
        x = torch.randn(batch, 6, generator=g, dtype=torch.float64) + 1.0
        h = torch.relu(x @ w1.double()) + 0.5 * torch.randn(batch, 18, generator=g, dtype=torch.float64)
        y = h @ w2.double() + torch.randn(batch, 4, generator=g, dtype=torch.float64)
        out.append([x, h.reshape(batch, 2, 3, 3), y])
    return out


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_matches_reference(kernel):
    batches = make_batches(5, 12)
    acc = CKAAccumulator(["a", "b", "c"], kernel=kernel, threshold=0.7)
    for batch in batches:
        acc.update(batch)
    want = ref.minibatch_cka_matrix([[x.numpy() for x in b] for b in batches], kernel, 0.7)
    got = acc.compute()
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10, rtol=0)
    assert acc.num_batches == 5 and acc.num_samples == 60

    from_grams = CKAAccumulator(3, kernel=kernel, threshold=0.7)
    for batch in batches:
        from_grams.update_grams(torch.stack([gram(x, kernel, threshold=0.7) for x in batch]))
    torch.testing.assert_close(from_grams.compute(), got, rtol=0, atol=1e-14)


def test_float32_features_agree_with_float64_reference():
    batches = [[x.float() for x in b] for b in make_batches(3, 16, seed=1)]
    acc = CKAAccumulator(3)
    for batch in batches:
        acc.update(batch)
    want = ref.minibatch_cka_matrix([[x.double().numpy() for x in b] for b in batches])
    np.testing.assert_allclose(acc.compute().numpy(), want, atol=1e-5, rtol=0)


def test_minibatch_estimate_converges_to_full_data_value():
    (data,) = make_batches(1, 512, seed=2)
    full = cka_matrix(data, unbiased=True)
    errors = {}
    for batch in (8, 128, 512):  # the error shrinks like 1 / sqrt(batch): 4x from 8 to 128
        acc = CKAAccumulator(3)
        for start in range(0, 512, batch):
            acc.update([x[start : start + batch] for x in data])
        errors[batch] = float((acc.compute() - full).abs().max())
    assert errors[512] < 1e-12  # one batch is the full-data estimate
    assert errors[8] > 2 * errors[128]
    assert errors[128] < 0.01


def test_reshape_to_scales_by_layers():
    acc = CKAAccumulator(6, shape=(2, 3))
    assert acc.names[4] == "(1, 1)"
    for batch in make_batches(2, 10, seed=3):
        acc.update(batch + [2 * x for x in batch])
    flat, grid = acc.compute(), acc.compute(reshape=True)
    assert grid.shape == (2, 3, 2, 3)
    torch.testing.assert_close(grid[1, 2, 0, 1], flat[5, 1])
    torch.testing.assert_close(grid[0, :, 1, :].diagonal(), torch.ones(3, dtype=torch.float64))  # 2x is the same
    with pytest.raises(ToolkitError, match="needs the accumulator's shape"):
        CKAAccumulator(2).compute(reshape=True)
    with pytest.raises(ToolkitError, match="does not hold the 6 entries"):
        CKAAccumulator(6, shape=(4, 2))
    with pytest.raises(ToolkitError, match="threshold must be a positive"):
        CKAAccumulator(6, kernel="rbf", threshold=-1.0)
    with pytest.raises(ToolkitError, match="unknown kernel"):
        CKAAccumulator(6, kernel="cosine")


def halves(kernel="linear"):
    batches = make_batches(6, 9, seed=4)
    one, first, second = (CKAAccumulator(["a", "b", "c"], kernel=kernel) for _ in range(3))
    for i, batch in enumerate(batches):
        one.update(batch)
        (first if i % 2 else second).update(batch)
    return one, first, second


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_merge_of_two_half_streams_equals_one_stream(kernel):
    one, first, second = halves(kernel)
    first.merge(second)
    assert (first.num_batches, first.num_samples) == (6, 54)
    torch.testing.assert_close(first.hsic_sum, one.hsic_sum, rtol=1e-13, atol=0)
    torch.testing.assert_close(first.compute(), one.compute(), rtol=0, atol=1e-13)


def test_reset_state_dict_and_incompatible_merges(tmp_path):
    one, first, _ = halves()
    path = tmp_path / "acc.pt"
    torch.save(one.state_dict(), path)
    loaded = CKAAccumulator(["a", "b", "c"])
    loaded.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(loaded.compute(), one.compute(), rtol=0, atol=0)
    assert loaded.num_samples == one.num_samples
    one.reset()
    assert one.num_batches == 0 and not one.hsic_sum.any()
    with pytest.raises(ToolkitError, match="no batch was seen"):
        one.compute()
    for other, what in [(CKAAccumulator(["a", "b", "c"], kernel="rbf"), "kernel"),
                        (CKAAccumulator(["a", "b", "c"], unbiased=False), "unbiased"),
                        (CKAAccumulator(["a", "b"]), "names")]:
        with pytest.raises(ToolkitError, match=f"{what} differs"):
            first.merge(other)
        with pytest.raises(ToolkitError, match=f"{what} differs"):
            other.load_state_dict(first.state_dict())
    first.all_reduce()  # not initialised: a no-op
    assert first.num_batches == 3


def test_bad_batches_raise_naming_the_entry():
    acc = CKAAccumulator(["stem", "layer1"])
    x = torch.randn(6, 4)
    with pytest.raises(ToolkitError, match="got 1 feature tensors for 2 entries"):
        acc.update([x])
    with pytest.raises(ToolkitError, match=r"stem has 3 sample.*at least 4"):
        acc.update([x[:3], x[:3]])
    with pytest.raises(ToolkitError, match="stem has 6 samples but layer1 has 5"):
        acc.update([x, x[:5]])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ToolkitError, match="layer1 contains NaN or Inf"):
        acc.update([x, bad])
    with pytest.raises(ToolkitError, match="got 3 Gram matrices for 2 entries"):
        acc.update_grams(torch.zeros(3, 6, 6))
    with pytest.raises(ToolkitError, match=r"Gram matrix of layer1 contains NaN"):
        acc.update_grams(torch.stack([gram(x), gram(bad.nan_to_num(0)).fill_diagonal_(float("inf"))]))
    assert acc.num_batches == 0  # nothing half-added


def test_constant_entry_is_nan_with_warning_naming_it():
    acc = CKAAccumulator(["conv", "dead", "fc"])
    batches = make_batches(3, 8, seed=5)
    for x, _, y in batches:
        acc.update([x, torch.full((8, 5), 2.7), y])
    with pytest.warns(DegenerateCKAWarning, match="dead") as record:
        out = acc.compute()
    assert "conv" not in str(record[0].message)
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 1]).all() and torch.isfinite(out[0, 2])
    ones = CKAAccumulator(2, kernel="rbf")  # a constant Gram: its unbiased self-HSIC is only float64 rounding
    ones.update_grams(torch.stack([gram(batches[0][0], "rbf"), torch.ones(8, 8)]))
    with pytest.warns(DegenerateCKAWarning, match=r"\[1\]"):
        assert math.isnan(float(ones.compute()[0, 1]))
    partly = CKAAccumulator(2)  # constant in one batch only: still defined
    partly.update([batches[0][0], batches[0][2]])
    partly.update([batches[1][0], torch.zeros(8, 3)])
    assert torch.isfinite(partly.compute()).all()


def _rank_main(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        acc = CKAAccumulator(["a", "b", "c"], kernel="rbf")
        for i, batch in enumerate(make_batches(6, 9, seed=4)):
            if i % 2 == rank:
                acc.update(batch)
        acc.all_reduce()
        if rank == 0:
            torch.save(acc.state_dict(), out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_stream(tmp_path, monkeypatch):
    out_file = tmp_path / "state.pt"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a small machine: one thread each
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    one, _, _ = halves("rbf")
    merged = CKAAccumulator(["a", "b", "c"], kernel="rbf")
    merged.load_state_dict(torch.load(out_file, weights_only=True))
    assert (merged.num_batches, merged.num_samples) == (6, 54)
    torch.testing.assert_close(merged.hsic_sum, one.hsic_sum, rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.compute(), one.compute(), rtol=0, atol=1e-13)
