"""The MLP classifier of ``ufm.networks``: its shape, parameters, forward pass, training loop and features.

``H_0 = X`` (p x N), ``H_l = s(W_l H_{l-1} + b_l 1^T)`` for the D hidden layers, ``out = W_{D+1} H_D + b_{D+1} 1^T``;
trained on ``fit(out, Y) + lam/2 sum_l ||W_l||_F^2`` (the UFM conventions of THEORY.md §0) by an optax optimizer in
one compiled `lax.scan`, recording the parameters at chosen steps.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike, DTypeLike

from .._options import check_dtype
from ._args import as_key, positive, positive_int
from .data import Dataset, check_dataset

__all__ = [
    "MLPConfig",
    "MLPParams",
    "NetworkLayers",
    "TrainHistory",
    "TrainResult",
    "init_mlp",
    "network_forward",
    "train",
    "features",
    "fit_loss",
    "check_result",
    "check_inputs",
    "ACTIVATIONS",
    "LOSSES",
    "OPTIMIZERS",
    "DEFAULT_LR",
]

ACTIVATIONS = ("relu", "linear")
LOSSES = ("mse", "ce")
OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3}


class MLPConfig(NamedTuple):
    """The static shape of an MLP classifier.

    ``H_0 = X`` (p x N), ``H_l = s(Z_l)``, ``Z_l = W_l H_{l-1} + b_l 1^T`` for the D = len(widths) hidden layers,
    and ``out = W_{D+1} H_D + b_{D+1} 1^T`` (K x N). ``s`` is ReLU or the identity; ``bias=False`` drops every b_l.
    The penultimate features are H_D; the last L layers with H_{D-L+1} as free features form a depth-L UFM.
    """

    in_dim: int
    widths: tuple[int, ...]
    num_classes: int
    activation: str = "relu"
    loss: str = "mse"
    bias: bool = True

    @property
    def depth(self) -> int:
        return len(self.widths)

    def shapes(self) -> tuple[tuple[int, int], ...]:
        dims = (self.in_dim, *self.widths, self.num_classes)
        return tuple((dims[i + 1], dims[i]) for i in range(len(dims) - 1))


class MLPParams(NamedTuple):
    """``Ws = (W_1, ..., W_{D+1})`` (W_l is d_l x d_{l-1}); ``bs = (b_1, ..., b_{D+1})`` or None without biases."""

    Ws: tuple[jax.Array, ...]
    bs: tuple[jax.Array, ...] | None


class NetworkLayers(NamedTuple):
    """Every layer of an MLP on a dataset: ``H = (H_0 = X, H_1, ..., H_D)`` (post-activation, d_l x N),
    ``Z = (Z_1, ..., Z_D)`` (pre-activation) and ``out`` (K x N)."""

    H: tuple[jax.Array, ...]
    Z: tuple[jax.Array, ...]
    out: jax.Array


def _check_config(in_dim, widths, num_classes, activation, loss, bias) -> MLPConfig:
    if isinstance(widths, numbers.Integral) and not isinstance(widths, bool):
        widths = (widths,)
    if not isinstance(widths, (tuple, list)) or len(widths) == 0:
        raise ValueError(f"widths must be a non-empty sequence (d_1, ..., d_D) of hidden widths; got {widths!r}")
    ws = tuple(positive_int(f"widths[{i}]", w, f"d_{i + 1}, a hidden width") for i, w in enumerate(widths))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False; got {bias!r}")
    return MLPConfig(int(in_dim), ws, int(num_classes), activation, loss, bias)


def init_mlp(config: MLPConfig, key: jax.Array, scale: float = 1.0, dtype: DTypeLike | None = None) -> MLPParams:
    """Random initial parameters: ``W_l ~ N(0, g scale^2 / d_{l-1})`` with gain g = 2 into a ReLU (He et al. 2015)
    and g = 1 otherwise (linear layers and the output layer); biases 0."""
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    shapes = config.shapes()
    keys = jax.random.split(key, len(shapes))
    Ws = []
    for i, (k, s) in enumerate(zip(keys, shapes, strict=True)):
        gain = 2.0 if (config.activation == "relu" and i < len(shapes) - 1) else 1.0
        Ws.append(jnp.asarray(scale * math.sqrt(gain / s[1]), dtype) * jax.random.normal(k, s, dtype))
    bs = tuple(jnp.zeros((s[0],), dtype) for s in shapes) if config.bias else None
    return MLPParams(tuple(Ws), bs)


def network_forward(config: MLPConfig, params: MLPParams, X: jax.Array) -> NetworkLayers:
    """All layers of the MLP on inputs X (p x N); see `MLPConfig` for the formulas. Pure and jittable."""
    H: list[jax.Array] = [X]
    Z: list[jax.Array] = []
    h = X
    D = config.depth
    for l in range(D + 1):
        z = params.Ws[l] @ h
        if params.bs is not None:
            z = z + params.bs[l][:, None]
        if l == D:
            return NetworkLayers(tuple(H), tuple(Z), z)
        Z.append(z)
        h = jax.nn.relu(z) if config.activation == "relu" else z
        H.append(h)
    raise AssertionError  # unreachable


def fit_loss(loss: str, out: jax.Array, Y: jax.Array) -> jax.Array:
    """The fit of outputs ``out`` (K x N) to targets ``Y`` (K x N): ``1/(2N)||out - Y||_F^2`` ("mse") or
    ``-1/N sum_i <Y_i, log softmax(out_i)>`` ("ce")."""
    N = out.shape[1]
    if loss == "mse":
        return jnp.sum((out - Y) ** 2) / (2 * N)
    return -jnp.sum(Y * jax.nn.log_softmax(out, axis=0)) / N


def _objective(config: MLPConfig, wd, params: MLPParams, X, Y, y):
    """fit(out, Y) + wd/2 sum_l ||W_l||_F^2, and (fit, training error) as aux."""
    out = network_forward(config, params, X).out
    fit = fit_loss(config.loss, out, Y)
    reg = wd / 2 * sum(jnp.sum(W**2) for W in params.Ws)
    err = jnp.mean((jnp.argmax(out, axis=0) != y).astype(out.dtype))
    return fit + reg, (fit, err)


class TrainHistory(NamedTuple):
    """Per-step traces: entry k is evaluated at the parameters after k steps, on the batch used by step k (the full
    training set when training full-batch): the objective (fit + weight decay), the fit and the training error."""

    loss: np.ndarray
    fit: np.ndarray
    error: np.ndarray


class TrainResult(NamedTuple):
    """The result of `train`.

    Attributes:
      config: the `MLPConfig`.
      params: the final `MLPParams`.
      snapshots: `MLPParams` with a leading axis R: the parameters after ``steps[r]`` optimiser steps.
      steps: (R,) the recorded steps (0 = the initialisation).
      history: `TrainHistory` (length = number of steps).
      weight_decay: lam in the penalty lam/2 sum_l ||W_l||_F^2.
      loss, fit, error: objective, fit and training error of the final parameters on the full training set.
      finite: False if the objective became non-finite (lower ``lr``); numerical failure is a flag, not an error.
    """

    config: MLPConfig
    params: MLPParams
    snapshots: MLPParams
    steps: np.ndarray
    history: TrainHistory
    weight_decay: float
    loss: float
    fit: float
    error: float
    finite: bool

    @property
    def zero_error_step(self) -> int | None:
        """The first step k from which the recorded training error stays 0 (history.error[j] = 0 for all j >= k,
        and the final error is 0): the start of the terminal phase of training (Papyan et al. 2020). None if the
        run never reached it. With minibatches the history holds batch errors, so this is only indicative."""
        e = np.append(self.history.error, self.error)
        nz = np.flatnonzero(e != 0)
        if nz.size == 0:
            return 0
        k = int(nz[-1]) + 1
        return k if k < e.size else None

    def snapshot(self, i: int) -> MLPParams:
        """The parameters of recorded snapshot i (negative i counts from the end), after ``steps[i]`` steps."""
        R = int(self.steps.size)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -R <= i < R:
            raise ValueError(
                f"snapshot index must be an integer in [-R, R) with R = {R} recorded steps "
                f"{self.steps.tolist()}; got {i!r}"
            )
        return jax.tree_util.tree_map(lambda a: a[int(i)], self.snapshots)


def _optimizer(optimizer, lr, momentum) -> optax.GradientTransformation:
    """The optax transformation named by ``optimizer`` (or ``optimizer`` itself): ``optax.sgd`` without or with
    heavy-ball momentum, or ``optax.adam``."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=momentum if optimizer == "momentum" else None)


@functools.partial(jax.jit, static_argnames=("config", "steps", "batch_size", "optimizer", "momentum", "n_records"))
def _train_jit(params0, X, Y, y, key, lr, wd, slots, *, config, steps, batch_size, optimizer, momentum, n_records):
    opt = _optimizer(optimizer, lr, momentum)
    obj = functools.partial(_objective, config, wd)
    grad_fn = jax.value_and_grad(obj, has_aux=True)
    N = X.shape[1]

    def write(buf, params, slot):
        i = jnp.maximum(slot, 0)
        return jax.tree_util.tree_map(lambda b, p: b.at[i].set(jnp.where(slot >= 0, p, b[i])), buf, params)

    buf0 = jax.tree_util.tree_map(lambda p: jnp.zeros((n_records,) + p.shape, p.dtype), params0)
    buf0 = write(buf0, params0, slots[0])

    def step(carry, k):
        params, state, buf = carry
        if batch_size is None:
            Xb, Yb, yb = X, Y, y
        else:
            idx = jax.random.choice(jax.random.fold_in(key, k), N, (batch_size,), replace=False)
            Xb, Yb, yb = X[:, idx], Y[:, idx], y[idx]
        (v, (fit, err)), g = grad_fn(params, Xb, Yb, yb)
        upd, state = opt.update(g, state, params)
        params = optax.apply_updates(params, upd)
        buf = write(buf, params, slots[k + 1])
        return (params, state, buf), (v, fit, err)

    (params, _, buf), hist = jax.lax.scan(step, (params0, opt.init(params0), buf0), jnp.arange(steps))
    v, (fit, err) = obj(params, X, Y, y)
    return params, buf, hist, v, fit, err


def _learning_rate(optimizer: Any, lr: float | None) -> float:
    """The learning rate of a named optimizer (its `DEFAULT_LR` when None); 0 for an optax transformation (its own)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS} or an optax.GradientTransformation; got {optimizer!r}"
            )
        return DEFAULT_LR[optimizer] if lr is None else positive("lr", lr)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be a string in {OPTIMIZERS} or an optax.GradientTransformation; got {optimizer!r}"
        )
    return 0.0


def _batch_size(batch_size: Any, N: int) -> int | None:
    """The minibatch size, or None for full batch (also when it equals N)."""
    if batch_size is None:
        return None
    batch_size = positive_int("batch_size", batch_size, "samples per minibatch")
    if batch_size > N:
        raise ValueError(f"batch_size must be <= N = {N}; got {batch_size}")
    return None if batch_size == N else batch_size


def _record_slots(record_steps: Any, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted recorded steps (R,) (default: 11 evenly spaced in [0, steps]) and, for each step 0..steps, its
    slot in the record buffer or -1."""
    if record_steps is None:
        rec = np.unique(np.linspace(0, steps, 11).round().astype(np.int64))
    else:
        rec = np.asarray(record_steps)
        if rec.ndim != 1 or rec.size == 0 or not np.issubdtype(rec.dtype, np.integer):
            raise ValueError(f"record_steps must be a non-empty 1-D sequence of integers in [0, steps]; got {rec!r}")
        if rec.min() < 0 or rec.max() > steps:
            raise ValueError(f"record_steps must lie in [0, steps = {steps}]; got min {rec.min()}, max {rec.max()}")
        rec = np.unique(rec)
    slots = np.full(steps + 1, -1, np.int32)
    slots[rec] = np.arange(rec.size, dtype=np.int32)
    return rec, slots


def train(
    data: Dataset,
    widths: int | Sequence[int],
    *,
    activation: str = "relu",
    loss: str = "mse",
    bias: bool = True,
    weight_decay: float = 1e-3,
    optimizer: str | optax.GradientTransformation = "adam",
    lr: float | None = None,
    momentum: float = 0.9,
    steps: int = 1000,
    batch_size: int | None = None,
    record_steps: ArrayLike | None = None,
    key: jax.Array | int | None = None,
    init_scale: float = 1.0,
    dtype: DTypeLike | None = None,
) -> TrainResult:
    """Train an MLP classifier (`MLPConfig`) on ``data``; the whole run is one compiled `lax.scan`.

    Minimises ``fit(out, Y) + weight_decay/2 sum_l ||W_l||_F^2`` (fit: MSE ``1/(2N)||out - Y||_F^2`` or CE
    ``1/N sum_i CE``, the UFM conventions of THEORY.md §0; the penalty is part of the objective, so with Adam this
    is L2 regularisation, not AdamW). Full-batch by default; with ``batch_size`` every step draws a batch uniformly
    without replacement. The parameters are recorded after each step in ``record_steps`` (default: 11 steps
    evenly spaced from 0 to ``steps``), so that the features of every layer at those steps are `features`.

    Args:
      data: the training `Dataset`.
      widths: hidden widths (d_1, ..., d_D).
      activation: "relu" or "linear" (a linear MLP: features are an affine map of the inputs).
      loss: "mse" or "ce" (one-hot targets).
      bias: biases in every layer (unregularised), or none.
      weight_decay: lam >= 0.
      optimizer: "sgd", "momentum" (heavy ball, ``momentum``) or "adam", or any optax transformation
        (then ``lr`` is ignored).
      lr: learning rate (default 0.1 sgd, 0.05 momentum, 3e-3 adam); a new value does not recompile.
        The defaults (MSE, Adam 3e-3, weight decay 1e-3) reach the terminal phase on digits with a 4 x 64 MLP in a
        few hundred full-batch steps (per-layer NC1 falling with depth to ~0.03 in the penultimate layer).
      steps: number of optimiser steps.
      batch_size: None (full batch) or the minibatch size (<= N).
      record_steps: the steps after which the parameters are saved (integers in [0, steps]).
      key: a `jax.random.key` or int seed (init and batches).
      init_scale: multiplies the He/LeCun init (see `init_mlp`).
      dtype: float32 or float64 (default: float32 for float32 data, else JAX's default float, float64 under
        ``jax_enable_x64``); the data are cast to it.

    Returns:
      A `TrainResult`. A run whose objective became non-finite has ``finite=False`` (lower lr).

    Example:
      >>> import ufm.networks as nets
      >>> data = nets.gaussian_mixture(3, 20, 10, seed=0)
      >>> res = nets.train(data, (16, 16), steps=200, record_steps=[0, 100, 200])
      >>> res.steps.tolist(), res.error
      ([0, 100, 200], 0.0)
    """
    data = check_dataset(data)
    config = _check_config(data.p, widths, data.num_classes, activation, loss, bias)
    run = _train_options(data, steps, weight_decay, optimizer, lr, momentum, batch_size, record_steps, dtype)
    k_init, k_batch = jax.random.split(as_key(key))
    params0 = init_mlp(config, k_init, positive("init_scale", init_scale), run.dtype)
    return _run_training(data, config, run, params0, k_batch)


class _TrainOptions(NamedTuple):
    """The validated options of `train`: steps, weight decay, lr, momentum, batch size, the recorded steps and
    their slot per step, and the dtype."""

    optimizer: Any
    steps: int
    weight_decay: float
    lr: float
    momentum: float
    batch_size: int | None
    record_steps: np.ndarray
    slots: np.ndarray
    dtype: Any


def _train_options(data, steps, weight_decay, optimizer, lr, momentum, batch_size, record_steps, dtype):
    """`train`'s options checked (in this order; a ValueError/TypeError names the first bad one)."""
    steps = positive_int("steps", steps, "optimiser steps")
    wd = positive("weight_decay", weight_decay, allow_zero=True)
    lr = _learning_rate(optimizer, lr)
    momentum = positive("momentum", momentum, allow_zero=True)
    batch_size = _batch_size(batch_size, data.N)
    rec, slots = _record_slots(record_steps, steps)
    dt = check_dtype(np.float32 if (dtype is None and data.X.dtype == np.float32) else dtype)
    return _TrainOptions(optimizer, steps, wd, lr, momentum, batch_size, rec, slots, dt)


def _run_training(data, config: MLPConfig, run: _TrainOptions, params0, k_batch) -> TrainResult:
    """The compiled training loop from ``params0`` (`_train_jit`), and its `TrainResult`."""
    dt = run.dtype
    X = jnp.asarray(data.X, dt)
    Y = jnp.asarray(np.eye(data.num_classes)[:, data.y], dt)
    y = jnp.asarray(data.y, jnp.int32)
    params, buf, (hv, hf, he), v, fit, err = _train_jit(
        params0,
        X,
        Y,
        y,
        k_batch,
        jnp.asarray(run.lr, dt),
        jnp.asarray(run.weight_decay, dt),
        jnp.asarray(run.slots),
        config=config,
        steps=run.steps,
        batch_size=run.batch_size,
        optimizer=run.optimizer,
        momentum=run.momentum,
        n_records=int(run.record_steps.size),
    )
    hist = TrainHistory(np.asarray(hv), np.asarray(hf), np.asarray(he))
    finite = bool(np.all(np.isfinite(hist.loss)) and np.isfinite(float(v)))
    return TrainResult(
        config, params, buf, run.record_steps, hist, run.weight_decay, float(v), float(fit), float(err), finite
    )


def check_result(result: Any, name: str = "result") -> TrainResult:
    """``result`` if it is a `TrainResult`, else a TypeError naming ``name``."""
    if not isinstance(result, TrainResult):
        raise TypeError(f"{name} must be a ufm.networks.TrainResult (from train); got {type(result).__name__}")
    return result


def check_inputs(result: TrainResult, data: Dataset, name: str = "data") -> Dataset:
    """``data`` if it is a `Dataset` with the p inputs and K classes ``result`` was trained on, else a ValueError."""
    data = check_dataset(data, name)
    if data.p != result.config.in_dim or data.num_classes != result.config.num_classes:
        raise ValueError(
            f"{name} must have p = {result.config.in_dim} inputs and K = {result.config.num_classes} "
            f"classes like the training data; got p = {data.p}, K = {data.num_classes}"
        )
    return data


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_jit(config, params, X):
    return network_forward(config, params, X)


def features(result: TrainResult, data: Dataset, snapshot: int = -1) -> NetworkLayers:
    """Features of every layer (`NetworkLayers`, NumPy arrays in the training dtype) of recorded snapshot
    ``snapshot`` (default: the last) on ``data`` (the training set or any set with the same p and K)."""
    result = check_result(result)
    data = check_inputs(result, data)
    params = result.snapshot(snapshot)
    dt = params.Ws[0].dtype
    lay = _forward_jit(result.config, params, jnp.asarray(data.X, dt))
    return jax.tree_util.tree_map(np.asarray, lay)
