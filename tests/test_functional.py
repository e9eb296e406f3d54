"""cka_scale.functional against the float64 NumPy reference, its invariances (both ways), and its errors."""

import math
import warnings

import cka_reference as ref
import numpy as np
import pytest
import torch

import cka_scale.functional as F
import cka_scale.kernels as K
from cka_scale import (
    DegenerateCKAWarning,
    ToolkitError,
    cka_id,
    cka_matrix,
    gram,
    gram_linear,
    gram_rbf,
    hsic,
    hsic_matrix,
    linear_cka,
    list_kernels,
    rbf_cka,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ESTIMATORS = [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]


def related(rng, n, shape, base=None, offset=3.0):
    """Features (n, *shape) with non-zero mean and a random scale, related to ``base`` when given."""
    d = int(np.prod(shape))
    x = rng.standard_normal((n, d))
    if base is not None:
        b = base.reshape(n, -1)
        x += b @ rng.standard_normal((b.shape[1], d)) / np.sqrt(b.shape[1])
    return (offset + rng.uniform(0.5, 5.0) * x).reshape(n, *shape)


def engine(x, y, kernel, unbiased, threshold=1.0):
    if kernel == "linear":
        return linear_cka(x, y, unbiased=unbiased)
    return rbf_cka(x, y, threshold=threshold, unbiased=unbiased)


def test_kornblith_known_answers():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    expected = {("linear", False, 1.0): 0.55761, ("rbf", False, 0.5): 0.65483, ("linear", True, 1.0): 0.51346}
    for (kernel, unbiased, threshold), value in expected.items():
        want = ref.cka(x, y, kernel, unbiased, threshold)
        assert want == pytest.approx(value, abs=5e-6)
        got = engine(torch.from_numpy(x), torch.from_numpy(y), kernel, unbiased, threshold)
        assert got.dtype == torch.float64 and got.ndim == 0
        assert float(got) == pytest.approx(want, abs=1e-12)


SHAPES = {
    "n5-d1-vs-d3": (5, (1,), (3,)),
    "n6-d1-vs-d1": (6, (1,), (1,)),
    "d>>n": (6, (400,), (250,)),
    "4d-maps": (8, (3, 4, 4), (2, 5, 5)),
    "n40": (40, (7,), (12,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
@pytest.mark.parametrize("case", list(SHAPES))
def test_pairwise_matches_reference(case, kernel, unbiased, dtype):
    n, sx, sy = SHAPES[case]
    rng = np.random.default_rng(list(SHAPES).index(case))
    x = related(rng, n, sx)
    y = related(rng, n, sy, base=x)
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    want = ref.cka(xt.double().numpy(), yt.double().numpy(), kernel, unbiased)  # the same (rounded) values
    got = engine(xt, yt, kernel, unbiased)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < TOL[dtype], (float(got), want)


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_matrix_matches_reference_over_many_row_blocks(kernel, unbiased, monkeypatch):
    rng = np.random.default_rng(3)
    n = 13
    xs = [related(rng, n, (4,))]
    for shape in [(1,), (30,), (2, 3, 3)]:
        xs.append(related(rng, n, shape, base=xs[-1]))
    ys = [related(rng, n, (5,), base=xs[1]), related(rng, n, (2,), base=xs[0])]
    want_within = ref.cka_matrix(xs, None, kernel, unbiased)
    want_cross = ref.cka_matrix(xs, ys, kernel, unbiased)
    for block in (F._BLOCK_ELEMENTS, 1, 100):  # one block; one row per block; a few rows
        monkeypatch.setattr(F, "_BLOCK_ELEMENTS", block)
        within = cka_matrix([torch.from_numpy(x) for x in xs], kernel=kernel, unbiased=unbiased)
        cross = cka_matrix([torch.from_numpy(x) for x in xs], [torch.from_numpy(y) for y in ys], kernel=kernel,
                           unbiased=unbiased)
        np.testing.assert_allclose(within.numpy(), want_within, atol=1e-10, rtol=0)
        np.testing.assert_allclose(cross.numpy(), want_cross, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_matrix_equals_pairwise(kernel, unbiased):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(9, d, generator=g) for d in (2, 5, 11)]
    ys = [xs[0] @ torch.randn(2, 3, generator=g) + torch.randn(9, 3, generator=g), torch.randn(9, 2, 2, generator=g)]
    full = cka_matrix(xs, ys, kernel=kernel, unbiased=unbiased)
    assert full.shape == (3, 2) and full.dtype == torch.float64
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(full[i, j]) == pytest.approx(float(engine(x, y, kernel, unbiased)), abs=1e-12)
    within = cka_matrix(xs, kernel=kernel, unbiased=unbiased)
    torch.testing.assert_close(within, within.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(within, cka_matrix(xs, xs, kernel=kernel, unbiased=unbiased), rtol=0, atol=1e-12)
    torch.testing.assert_close(within.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_grams_match_reference():
    rng = np.random.default_rng(5)
    x = related(rng, 7, (3, 2))
    h = np.eye(7) - 1 / 7
    np.testing.assert_allclose(gram_linear(torch.from_numpy(x)).numpy(), h @ ref.gram_linear(x) @ h, atol=1e-10)
    for threshold in (1.0, 0.5, 2.0):
        got = gram_rbf(torch.from_numpy(x), threshold).numpy()
        np.testing.assert_allclose(got, ref.gram_rbf(x, threshold), atol=1e-12)
        np.testing.assert_allclose(gram(torch.from_numpy(x), "rbf", threshold=threshold).numpy(), got, atol=0)
    assert gram_linear(torch.randn(4)).shape == (4, 4)  # (n,) is one feature
    assert F.flatten_features(torch.zeros(3, 2, 5)).shape == (3, 10)
    assert F.flatten_features(torch.zeros(3)).shape == (3, 1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
def test_median_is_exact_over_all_entries(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 3, (n, 2), generator=g).double()  # many ties
    d = torch.cdist(x, x).square()
    want = float(np.median(d.numpy()))
    assert K._median_of_all(d) == want
    upper = d[torch.triu_indices(n, n, 1).unbind()]
    total = n * n
    positions = sorted({(k - n) // 2 for k in {(total - 1) // 2, total // 2} if k >= n})
    if positions:  # the selection used on accelerators agrees with NumPy's
        assert K._select_torch(upper, positions) == K._select_numpy(upper, positions)


def test_hsic_matches_reference_on_uncentred_grams():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((2, 10, 6)) + 4.0
    k, l = a @ a.T, np.exp(-0.1 * ((b[:, None] - b[None]) ** 2).sum(-1))  # noqa: E741
    for unbiased in (False, True):
        got = hsic(torch.from_numpy(k), torch.from_numpy(l), unbiased=unbiased)
        assert got.dtype == torch.float64 and got.ndim == 0
        assert float(got) == pytest.approx(ref.hsic(k, l, unbiased), rel=1e-10)
        stack = torch.from_numpy(np.stack([k, l, k + l]))
        want = [[ref.hsic(p, q, unbiased) for q in stack.numpy()] for p in stack.numpy()]
        np.testing.assert_allclose(hsic_matrix(stack, unbiased=unbiased).numpy(), want, rtol=1e-10)
        np.testing.assert_allclose(hsic_matrix(stack[:1], stack[1:], unbiased=unbiased).numpy(), [want[0][1:]],
                                   rtol=1e-10)


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_invariances(kernel, unbiased):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64) + 2.0
    y = x[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64) + torch.randn(30, 4, generator=g,
                                                                                      dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = float(engine(x, y, kernel, unbiased))
    assert float(engine(x, x, kernel, unbiased)) == pytest.approx(1.0, abs=1e-12)
    assert float(engine(y, x, kernel, unbiased)) == pytest.approx(base, abs=1e-12)  # symmetric
    for transformed in (x @ q, 7.5 * x, 0.01 * x @ q + 100.0, x[:, torch.randperm(6, generator=g)]):
        assert float(engine(transformed, y, kernel, unbiased)) == pytest.approx(base, abs=1e-10)
    shuffled = x[torch.randperm(30, generator=g)]  # breaks the sample pairing: CKA must notice
    assert abs(float(engine(shuffled, x, kernel, unbiased)) - 1.0) > 0.3


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_is_not_invariant_to_general_linear_maps(unbiased):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    a = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 30.0], dtype=torch.float64))
    a = a @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    assert torch.linalg.matrix_rank(a) == 5
    assert float(linear_cka(x, x @ a, unbiased=unbiased)) < 0.6
    assert float(cka_matrix([x], [x @ a.T], unbiased=unbiased)[0, 0]) < 0.6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_low_precision_and_integer_inputs_upcast(dtype):
    g = torch.Generator().manual_seed(6)
    x = (4 * torch.randn(12, 5, generator=g)).to(dtype)
    y = (4 * torch.randn(12, 3, generator=g)).to(dtype) + x[:, :3]
    assert gram_linear(x).dtype == torch.float32
    want = ref.cka(x.double().numpy(), y.double().numpy(), "linear", True)
    assert float(linear_cka(x, y, unbiased=True)) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_gradients_are_exact(kernel, unbiased):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: engine(a, y, kernel, unbiased), (x,))  # RBF: through the median too
    assert torch.autograd.gradcheck(lambda a: cka_matrix([a, y], [2 * a], kernel=kernel, unbiased=unbiased), (x,))


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_constant_features_give_nan_with_a_named_warning(kernel, unbiased):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(10, 4, generator=g), torch.full((10, 3, 2), 0.1), torch.randn(10, 2, generator=g)]
    with pytest.warns(DegenerateCKAWarning, match=r"xs\[1\]") as record:
        m = cka_matrix(xs, kernel=kernel, unbiased=unbiased)
    assert len(record) == 1 and "xs[0]" not in str(record[0].message)
    assert torch.isnan(m[1]).all() and torch.isnan(m[:, 1]).all()
    keep = m[[0, 2]][:, [0, 2]]
    assert torch.isfinite(keep).all() and keep.diagonal().sub(1).abs().max() < 1e-6
    with pytest.warns(DegenerateCKAWarning, match="for y"):
        assert math.isnan(float(engine(xs[0], torch.ones(10), kernel, unbiased)))


def test_rbf_median_zero_without_constant_features():
    x = torch.zeros(8, 2)
    x[0] = 1.0  # 7 of 8 samples coincide: the median distance is 0, sigma -> 0
    k = gram_rbf(x)
    assert torch.equal(k, (torch.cdist(x, x) == 0).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(rbf_cka(x, x)) == pytest.approx(1.0)


def test_degenerate_by_scale_in_cka_from_hsic():
    cross = torch.tensor([[1e-20, 0.5], [0.5, 1.0]], dtype=torch.float64)
    diag = cross.diagonal()
    assert torch.isfinite(F.cka_from_hsic(cross, diag, diag)).all()  # positive: fine without a scale
    scale = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with pytest.warns(DegenerateCKAWarning, match="a, b|a"):
        out = F.cka_from_hsic(cross, diag, diag, names_x=["a", "b"], names_y=["a", "b"], scale_x=scale, scale_y=scale)
    assert torch.isnan(out[0]).all() and float(out[1, 1]) == 1.0
    with pytest.warns(DegenerateCKAWarning, match=r"x\[0\]"):
        F.cka_from_hsic(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(2.0))


def test_bad_input_errors_name_the_input():
    x = torch.randn(5, 3)
    with pytest.raises(ToolkitError, match="x has 5 samples but y has 6"):
        linear_cka(x, torch.randn(6, 3))
    with pytest.raises(ToolkitError, match=r"x has 3 sample.*at least 4"):
        linear_cka(x[:3], x[:3], unbiased=True)
    with pytest.raises(ToolkitError, match=r"x has 1 sample.*at least 2"):
        linear_cka(x[:1], x[:1])
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ToolkitError, match=r"xs\[1\] contains NaN or Inf"):
        cka_matrix([x, bad])
    bad[2, 1] = float("inf")
    with pytest.raises(ToolkitError, match=r"ys\[0\] contains NaN or Inf"):
        cka_matrix([x], [bad], kernel="rbf")
    with pytest.raises(ToolkitError, match=r"xs\[0\] has 5 samples but xs\[2\] has 4"):
        cka_matrix([x, x, x[:4]])
    with pytest.raises(ToolkitError, match=r"unknown kernel 'cosine'.*linear, rbf"):
        cka_matrix([x], kernel="cosine")
    with pytest.raises(ToolkitError, match="threshold must be a positive"):
        rbf_cka(x, x, threshold=0.0)
    with pytest.raises(ToolkitError, match="Gram matrix of grams\\[1\\] contains NaN"):
        hsic_matrix(torch.stack([torch.eye(5), torch.full((5, 5), float("nan"))]))
    with pytest.raises(ToolkitError, match=r"\(m, n, n\)"):
        hsic_matrix(torch.zeros(2, 5, 4))
    with pytest.raises(ToolkitError, match="l has 4 samples"):
        hsic(torch.eye(5), torch.eye(4))


def test_registry_and_ids():
    assert list_kernels() == ["linear", "rbf"] == sorted(F.KERNELS)
    assert cka_id("linear", True) == "cka-kernel=linear-hsic=song-score"  # similarity-repository convention
    assert cka_id("rbf", False, 0.5) == "cka-kernel=(rbf-threshold=0.5)-hsic=gretton-score"
    with pytest.raises(ToolkitError, match="choose one of linear, rbf"):
        cka_id("poly", True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_cuda_matches_reference(kernel, unbiased):
    rng = np.random.default_rng(11)
    xs = [related(rng, 33, (20,)), related(rng, 33, (3, 4, 4))]
    got = cka_matrix([torch.from_numpy(x).float().cuda() for x in xs], kernel=kernel, unbiased=unbiased)
    assert got.device.type == "cuda" and got.dtype == torch.float64
    want = ref.cka_matrix([torch.from_numpy(x).float().double().numpy() for x in xs], None, kernel, unbiased)
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=1e-5)


@pytest.mark.parametrize("kernel,unbiased", ESTIMATORS)
def test_reference_fast_path_equals_literal_formulas(kernel, unbiased):
    rng = np.random.default_rng(12)
    xs = [related(rng, 11, (3,))]
    xs += [related(rng, 11, (5,), base=xs[0]), related(rng, 11, (2, 2), base=xs[0])]
    literal = ref.cka_matrix(xs, None, kernel, unbiased)
    np.testing.assert_allclose(ref.cka_matrix(xs, None, kernel, unbiased, large=True), literal, atol=1e-12)
    np.testing.assert_allclose(ref.cka_matrix(xs[:1], xs[1:], kernel, unbiased, large=True), literal[:1, 1:],
                               atol=1e-12)
