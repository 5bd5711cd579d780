"""Parameters, forward pass and objective of a UFM (pure functions of ``(problem, params)``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._problem import UFM


class Params(NamedTuple):
    """UFM parameters: features ``H`` (d_1 x N), weights ``Ws = (W_1, ..., W_L)`` with W_l of shape
    d_{l+1} x d_l (W_L is K x d_L), and the output bias ``b`` (K,) or ``None`` when ``bias="none"``."""

    H: jax.Array
    Ws: tuple[jax.Array, ...]
    b: jax.Array | None


class Forward(NamedTuple):
    """Every layer of the forward pass (THEORY.md §4 notation).

    ``H``: (H_1, ..., H_L), the inputs of W_1..W_L (H_1 the free features, H_l = s(Z_l) for l >= 2).
    ``Z``: (Z_2, ..., Z_L), the pre-activations Z_l = W_{l-1} H_{l-1}.
    ``out``: the output W_L H_L + b 1^T (K x N).
    """

    H: tuple[jax.Array, ...]
    Z: tuple[jax.Array, ...]
    out: jax.Array


def check_params(problem: UFM, params: Params, name: str = "params") -> None:
    """Raise a clear ValueError/TypeError if ``params`` do not fit ``problem`` (before any compute)."""
    if not isinstance(params, Params):
        if isinstance(params, tuple) and len(params) == 3:
            params = Params(*params)
        else:
            raise TypeError(f"{name} must be ufm.Params(H, Ws, b); got {type(params).__name__}")
    (hs, ws, bs) = problem.param_shapes()
    dims = problem.widths + (problem.num_classes,)
    if np.shape(params.H) != hs:
        raise ValueError(f"{name}.H must have shape d_1 x N = {hs}; got {np.shape(params.H)}")
    if not isinstance(params.Ws, (tuple, list)) or len(params.Ws) != problem.L:
        got = len(params.Ws) if isinstance(params.Ws, (tuple, list)) else type(params.Ws).__name__
        raise ValueError(f"{name}.Ws must be a tuple of L={problem.L} matrices W_1..W_L; got {got}")
    for i, (W, s) in enumerate(zip(params.Ws, ws)):
        if np.shape(W) != s:
            raise ValueError(
                f"{name}.Ws[{i}] (W_{i + 1}) must have shape d_{i + 2} x d_{i + 1} = {s} "
                f"(widths {dims}); got {np.shape(W)}"
            )
    if bs is None and params.b is not None:
        raise ValueError(f"{name}.b must be None for bias='none'; got an array of shape {np.shape(params.b)}")
    if bs is not None and (params.b is None or np.shape(params.b) != bs):
        raise ValueError(
            f"{name}.b must have shape (K,) = {bs} for bias={problem.bias!r}; "
            f"got {None if params.b is None else np.shape(params.b)}"
        )
    leaves = [params.H, *params.Ws] + ([] if params.b is None else [params.b])
    dtypes = {jnp.asarray(x).dtype for x in leaves}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise TypeError(f"{name} must all share one floating dtype; got {sorted(map(str, dtypes))}")


def params_dtype(params: Params):
    return jnp.asarray(params.H).dtype


def init_params(problem: UFM, key: jax.Array, scale=1.0, dtype=None) -> Params:
    """Random initial parameters.

    Entries are independent Gaussians:

        H ~ N(0, scale^2),   W_l ~ N(0, scale^2 / d_l)   (fan-in scaling),   b = 0.

    With ``scale=1`` a linear network keeps the feature scale from layer to layer. Note (THEORY.md §0)
    that for depth P = L + 1 >= 3 the all-zero point is a strict local minimum, so very small scales
    can stall there. The papers' recipe (Dang et al. 2023) is N(0, 0.1^2) for every entry: pass explicit
    parameters for that.

    ``scale`` may be a traced scalar (it is vmapped over in sweeps); ``dtype`` defaults to JAX's default
    float (float64 under ``jax_enable_x64``).
    """
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    hs, ws, bs = problem.param_shapes()
    keys = jax.random.split(key, problem.L + 1)
    scale = jnp.asarray(scale, dtype)
    H = scale * jax.random.normal(keys[0], hs, dtype)
    Ws = tuple(
        scale * jax.random.normal(k, s, dtype) / jnp.sqrt(jnp.asarray(s[1], dtype)) for k, s in zip(keys[1:], ws)
    )
    b = None if bs is None else jnp.zeros(bs, dtype)
    return Params(H, Ws, b)


@jax.custom_jvp
def layer_matmul(W: jax.Array, H: jax.Array) -> jax.Array:
    """``W @ H`` whose derivatives run every product in the untransposed layout.

    Reverse mode transposes the tangent ``dW H + W dH``; the transpose of ``W dH`` in dH is ``W^T G``, which XLA's
    CPU float64 dot runs at ~60% of the rate of ``W G`` (measured: 63 ms against 39 ms for d = 256, N = 5000 on
    the 2-core box). The tangent below writes ``W dH`` as ``(W^T)^T dH`` with ``W^T`` materialised behind an
    optimisation barrier, so its transpose is the plain product ``W^T G``. The rule is the exact derivative (it
    is linear in the tangents and built from differentiable primitives), so ``jvp(grad)`` (the Hessian-vector
    products of the certificates) stays exact; tests/test_model_vjp.py checks both against finite differences.
    """
    return W @ H


@layer_matmul.defjvp
def _layer_matmul_jvp(primals, tangents):
    W, H = primals
    dW, dH = tangents
    Wt = jax.lax.optimization_barrier(W.T)
    return W @ H, dW @ H + Wt.T @ dH


def layer_product(W: jax.Array, H: jax.Array) -> jax.Array:
    """The layer product ``W @ H`` of `forward`: `layer_matmul` in float64, plain ``W @ H`` in float32.

    In float32 the custom rule buys nothing measurable (GD-step loops, CPU time, one thread, ``python -m
    benchmarks.bench_steps --variants``: plain / custom 0.98-1.03 at the small and medium sizes, against 1.10-1.27 in
    float64; benchmarks/README.md), so float32 keeps XLA's own transpose of the dot and its results bit for bit.

    Args:
        W: (d_{l+1}, d_l) weights.
        H: (d_l, N) layer input.

    Returns:
        (d_{l+1}, N) array, ``W @ H``.
    """
    return layer_matmul(W, H) if W.dtype == jnp.float64 else W @ H


def _act(problem: UFM, x):
    return jax.nn.relu(x) if problem.activation == "relu" else x


def forward(problem: UFM, params: Params) -> Forward:
    """All layers of the UFM at ``params`` (see `Forward`)."""
    Hs = [params.H]
    Zs = []
    h = params.H
    for W in params.Ws[:-1]:
        z = layer_product(W, h)
        Zs.append(z)
        h = _act(problem, z)
        Hs.append(h)
    out = layer_product(params.Ws[-1], h)
    if params.b is not None:
        out = out + params.b[:, None]
    return Forward(tuple(Hs), tuple(Zs), out)


def targets(problem: UFM, dtype=None) -> jax.Array:
    """One-hot targets Y = blockdiag(1_{n_k}^T) (K x N), class-major.

    Built in-graph from the N integer labels (an iota comparison) rather than baked in as a K x N constant:
    XLA would otherwise constant-fold every operation on Y at compile time (seconds for K=10, N=5000).
    """
    dtype = dtype or jnp.result_type(float)
    labels = jnp.asarray(problem.labels(), jnp.int32)
    return jax.nn.one_hot(labels, problem.num_classes, dtype=dtype, axis=0)


def fit_loss(problem: UFM, out: jax.Array) -> jax.Array:
    """The data term: 1/(2N)||Out - Y||_F^2 (MSE) or 1/N sum_i CE(out_i, t_i) (CE with label smoothing)."""
    N = problem.N
    Y = targets(problem, out.dtype)
    if problem.loss == "mse":
        return jnp.sum((out - Y) ** 2) / (2 * N)
    alpha = jnp.asarray(problem.label_smoothing, out.dtype)
    T = (1 - alpha) * Y + alpha / problem.num_classes
    logp = jax.nn.log_softmax(out, axis=0)
    return -jnp.sum(T * logp) / N


def regulariser(problem: UFM, params: Params) -> jax.Array:
    """sum_l lam_W[l]/2 ||W_l||_F^2 + lam_H/2 ||H||_F^2 (+ lam_b/2 ||b||^2 with bias='reg')."""
    dt = params.H.dtype
    lam_W = jnp.asarray(problem.lam_W, dt)
    r = jnp.asarray(problem.lam_H, dt) / 2 * jnp.sum(params.H**2)
    for i, W in enumerate(params.Ws):
        r = r + lam_W[i] / 2 * jnp.sum(W**2)
    if problem.bias == "reg":
        assert params.b is not None  # bias="reg" has a b (check_params)
        r = r + jnp.asarray(problem.lam_b, dt) / 2 * jnp.sum(params.b**2)
    return r


def objective(problem: UFM, params: Params) -> jax.Array:
    """The UFM objective f = fit + regulariser (see `UFM`). Pure and jittable."""
    return fit_loss(problem, forward(problem, params).out) + regulariser(problem, params)


def objective_parts(problem: UFM, params: Params) -> tuple[jax.Array, jax.Array]:
    """(fit, regulariser) separately; their sum is `objective`."""
    return fit_loss(problem, forward(problem, params).out), regulariser(problem, params)


def tree_norm(tree) -> jax.Array:
    """Euclidean norm of a pytree seen as one flat vector (the gradient norm used for stopping)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves))
