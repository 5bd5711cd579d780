"""The BLAS product of the step benchmark (`benchmarks.blas_ffi`: SciPy's dgemm/sgemm as an XLA FFI custom call, a
primitive with bilinear JVP and transpose rules) against NumPy's products, plain XLA autodiff and central finite
differences: values in the four layouts and both dtypes, ``grad`` and ``jvp(grad)`` (Hessian-vector products),
``vmap`` against a loop (issue 20). Small shapes: a handful of compiles."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root (as in test_benchmarks_smoke)
    sys.path.insert(0, str(ROOT))

from benchmarks import blas_ffi  # noqa: E402

pytestmark = pytest.mark.skipif(not blas_ffi.available(), reason="SciPy's Cython BLAS or XLA's FFI not available")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_is_numpys_product_in_every_layout(dtype):
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    # op(A) op(B) = A B in every layout: pass A^T / B^T stored, with the transpose flag set
    got = jax.jit(
        lambda a, at, b, bt: [
            blas_ffi.gemm(x, y, ta, tb) for x, ta in ((a, False), (at, True)) for y, tb in ((b, False), (bt, True))
        ]
    )(A, A.T.copy(), B, B.T.copy())
    # sums of 4 products of O(1) numbers: rounding <= 4 eps max|A||B| (float32 eps 1.2e-7, float64 2.2e-16)
    tol = 4 * np.finfo(dtype).eps * np.abs(A).max() * np.abs(B).max() * 4
    for g in got:
        assert g.dtype == dtype and g.shape == (3, 5)
        np.testing.assert_allclose(g, ref, rtol=0, atol=tol)


def _objective(mm, Ws, H, Y):
    # a two-layer ReLU UFM's MSE + weight decay, with the products through `mm`
    Z = jax.nn.relu(mm(Ws[0], H))
    out = mm(Ws[1], Z)
    return jnp.sum((out - Y) ** 2) / (2 * H.shape[1]) + 1e-2 * (
        jnp.sum(Ws[0] ** 2) + jnp.sum(Ws[1] ** 2) + jnp.sum(H**2)
    )


def test_grad_and_hvp_match_plain_autodiff_and_finite_differences():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 4)), rng.standard_normal((3, 5)), rng.standard_normal((4, 6)))
    v = tuple(rng.standard_normal(a.shape) for a in x)
    Y = np.eye(3)[:, [0, 0, 1, 1, 2, 2]]

    def f(mm):
        return lambda x: _objective(mm, x[:2], x[2], Y)

    f_blas, f_ref = f(blas_ffi.matmul), f(jnp.matmul)
    g, hv = jax.jit(lambda x, v: (jax.grad(f_blas)(x), jax.jvp(jax.grad(f_blas), (x,), (v,))[1]))(x, v)
    g_ref, hv_ref = jax.grad(f_ref)(x), jax.jvp(jax.grad(f_ref), (x,), (v,))[1]
    # same sums in another order (BLAS against XLA's dot): rounding ~1e-15 on entries O(1)
    for a, b in zip(g + hv, g_ref + hv_ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    # central differences of the gradient along v: truncation O(eps^2 f''') ~ 1e-10, rounding O(1e-16 / eps) ~ 1e-11
    # (the random point is almost surely away from ReLU's kinks, where f is smooth)
    eps = 1e-5
    gp = jax.grad(f_blas)(tuple(a + eps * t for a, t in zip(x, v)))
    gm = jax.grad(f_blas)(tuple(a - eps * t for a, t in zip(x, v)))
    for a, b, c in zip(hv, gp, gm):
        np.testing.assert_allclose(a, (b - c) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_vmap_matches_a_loop_and_float32_stays_float32():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((2, 3, 4)).astype("float32")
    H = rng.standard_normal((2, 4, 5)).astype("float32")
    G = rng.standard_normal((2, 3, 5)).astype("float32")

    def f(W, H, G):  # value and the two backward products (dW = G H^T, dH = W^T G) of one layer
        out, vjp = jax.vjp(blas_ffi.matmul, W, H)
        return (out, *vjp(G))

    both = jax.jit(jax.vmap(f))(W, H, G)  # every operand batched
    shared = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(W[0], H, G)  # W shared by the lanes
    for i in range(2):
        want = (W[i] @ H[i], G[i] @ H[i].T, W[i].T @ G[i])
        want_shared = (W[0] @ H[i], G[i] @ H[i].T, W[0].T @ G[i])
        # float32 sums of 3-5 products of O(1) numbers: rounding ~1e-6
        for got, ref in zip([b[i] for b in both] + [b[i] for b in shared], want + want_shared):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # the gradient in a W shared by the lanes sums the lanes' G_i H_i^T (the transpose rule under vmap)
    dW = jax.jit(jax.grad(lambda W: jnp.sum(jax.vmap(lambda h: blas_ffi.matmul(W, h))(H) * G)))(W[0])
    np.testing.assert_allclose(dW, sum(G[i] @ H[i].T for i in range(2)), rtol=0, atol=1e-5)


def test_step_benchmark_blas_variant_follows_ufms_gd_steps():
    # bench_steps --variants at the tiny size: 3 GD steps of the objective with every product through BLAS land on
    # ufm.solve's objective's steps (XLA's dot); same sums in another order: float64 rounding ~1e-16 relative
    from benchmarks import bench_steps

    (row,) = bench_steps.product_variants(bench_steps.TINY_SIZES, dtypes=("float64",), rounds=1, log=lambda *a: None)
    assert row["max_rel_diff_3_steps"]["blas"] <= 1e-12
    assert row["blas_ms"] > 0
