"""Collapse in real trained networks, held against the UFM prediction in the same notebook.

``import ufm.networks`` (it is not imported by ``import ufm``). Three experiments from the papers that study what
the unconstrained features model abstracts away, on data that ships inside a package (scikit-learn's digits,
``pip install ufm[networks]``) or on a synthetic Gaussian mixture (no extra dependency):

* **Per-layer collapse** (Parker, Onal, Stengel, Intrater 2023, "Neural collapse in the intermediate hidden layers
  of classification neural networks"): `train` an MLP past zero training error, recording the parameters at chosen
  steps; `layer_metrics` gives NC1, NC2, angles and NCC accuracy of every layer at every recorded step.
* **Fine-grained structure** (Yang, Steinhardt, Hu 2023, "Are neurons actually collapsed? On the fine-grained
  structure in neural representations"): `fine_grained` trains on superclasses, clusters the penultimate features
  of each superclass without labels, and scores the recovery of the fine labels (best matching).
* **Shallow versus expressive** (E & Wojtowytsch 2022, "On the emergence of simplex symmetry in the final and
  penultimate layers of neural network classifiers"): `shallow_vs_expressive` sets a model whose features are an
  affine map of the inputs (which provably cannot collapse: `affine_nc1_floor`) beside a deep ReLU MLP and the UFM.

`ufm_reference` builds the UFM with the same K, class sizes, depth, loss, bias and weight decay as a trained network
and returns what a plot needs to draw the prediction beside the network's metrics.

Conventions (as everywhere in ``ufm``, THEORY.md §0): samples are **columns** (``X`` is p x N, features d x N),
datasets are stored **class-major** (labels non-decreasing, so the columns line up with ``ufm.targets``), the fit is
``1/(2N)||Out - Y||_F^2`` (MSE) or ``1/N sum_i CE`` (CE), and weight decay is the penalty ``lam/2 sum_l ||W_l||_F^2``
added to the objective (weights only, biases unregularised), so a network's ``weight_decay`` is the UFM's ``lam_W``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import metrics as _m
from ._options import check_dtype as _check_dtype

__all__ = [
    "Dataset",
    "as_dataset",
    "load_digits",
    "gaussian_mixture",
    "coarsen",
    "split",
    "MLPConfig",
    "MLPParams",
    "NetworkLayers",
    "TrainHistory",
    "TrainResult",
    "init_mlp",
    "network_forward",
    "train",
    "features",
    "LayerMetrics",
    "layer_metrics",
    "ufm_problem",
    "UFMReference",
    "ufm_reference",
    "AffineFloor",
    "affine_nc1_floor",
    "KMeans",
    "kmeans",
    "cluster_accuracy",
    "FineGrained",
    "fine_grained",
    "CollapseRow",
    "Comparison",
    "shallow_vs_expressive",
    "plot_layer_metrics",
    "plot_comparison",
]

ACTIVATIONS = ("relu", "linear")
LOSSES = ("mse", "ce")
OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3}


# ---------------------------------------------------------------------------------------------------------------
# data


class Dataset(NamedTuple):
    """A labelled dataset, samples as **columns**, stored class-major.

    Attributes:
      X: p x N inputs (float).
      y: (N,) integer labels in [0, K), non-decreasing (class-major, as ``ufm.UFM.labels()``).
      num_classes: K.
      fine: (N,) the original (fine) labels when ``y`` are superclasses (see `coarsen`), else None.
      name: a label for plots.
    """

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    fine: np.ndarray | None = None
    name: str = ""

    @property
    def N(self) -> int:
        return int(self.X.shape[1])

    @property
    def p(self) -> int:
        return int(self.X.shape[0])

    @property
    def class_sizes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.bincount(self.y, minlength=self.num_classes))


def as_dataset(X, y, *, fine=None, name: str = "") -> Dataset:
    """A `Dataset` from arrays in the scikit-learn layout: ``X`` is N x p (**one sample per row**), ``y`` (N,).

    The result stores X transposed (p x N) and sorted class-major (stably by ``y``, then by ``fine``). Labels must
    be the integers 0..K-1, each present at least once.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be a numeric N x p array (one sample per row); got shape {X.shape}, dtype {X.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must be a 1-D integer array of N labels; got shape {y.shape}, dtype {y.dtype}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have N = {X.shape[0]} labels (the rows of X: samples are rows here); "
                         f"got {y.shape[0]}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X must be finite")
    K = int(y.max()) + 1 if y.size else 0
    if y.size == 0 or y.min() < 0 or K < 2 or np.any(np.bincount(y, minlength=K) == 0):
        raise ValueError(f"y must use every label 0..K-1 with K >= 2; got the labels {np.unique(y).tolist()}")
    if fine is not None:
        fine = np.asarray(fine)
        if fine.shape != y.shape or not np.issubdtype(fine.dtype, np.integer):
            raise ValueError(f"fine must be N = {y.shape[0]} integer labels; got shape {fine.shape}")
        order = np.lexsort((fine, y))
        fine = fine[order].astype(np.int64)
    else:
        order = np.argsort(y, kind="stable")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    return Dataset(np.ascontiguousarray(X[order].T), y[order].astype(np.int64), K, fine, name)


def _check_dataset(data, name: str = "data") -> Dataset:
    if not isinstance(data, Dataset):
        raise TypeError(f"{name} must be a ufm.networks.Dataset (see as_dataset, load_digits); "
                        f"got {type(data).__name__}")
    if data.X.ndim != 2 or data.y.shape != (data.X.shape[1],):
        raise ValueError(f"{name}.X must be p x N and {name}.y (N,); got {data.X.shape} and {data.y.shape}")
    if np.any(np.diff(data.y) < 0):
        raise ValueError(f"{name}.y must be class-major (non-decreasing); build datasets with as_dataset")
    return data


def _pos_int(name: str, v: Any, what: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}); got {v!r}")
    return int(v)


def _subsample(X, y, n_per_class, seed, name):
    if n_per_class is None:
        return X, y
    n = _pos_int("n_per_class", n_per_class, "samples kept per class")
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(int(y.max()) + 1):
        idx = np.flatnonzero(y == k)
        if n > idx.size:
            raise ValueError(f"n_per_class must be <= {idx.size} (the smallest class of {name} has that many); got {n}")
        keep.append(np.sort(rng.choice(idx, n, replace=False)))
    keep = np.concatenate(keep)
    return X[keep], y[keep]


def load_digits(n_per_class: int | None = None, *, seed: int = 0, dtype=np.float64) -> Dataset:
    """scikit-learn's handwritten digits (8x8 images, K = 10, p = 64, 1797 samples; ships inside scikit-learn).

    Pixels are scaled to [0, 1] (divided by 16). ``n_per_class`` keeps a random balanced subset (seeded), so that
    the balanced UFM closed forms apply; ``None`` keeps all (class sizes 174..183).

    Raises ImportError naming the extra to install when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError(
            "ufm.networks.load_digits needs scikit-learn (the digits ship inside it): pip install 'ufm[networks]' "
            "(or pip install scikit-learn); gaussian_mixture needs no extra dependency"
        ) from e
    d = _sk_load_digits()
    X, y = _subsample(d.data / 16.0, d.target.astype(np.int64), n_per_class, seed, "digits")
    return as_dataset(X.astype(dtype), y, name="digits")


def gaussian_mixture(num_classes: int, n_per_class: int, dim: int, *, separation: float = 4.0, noise: float = 1.0,
                     seed: int = 0, dtype=np.float64) -> Dataset:
    """A synthetic Gaussian mixture: class k has mean mu_k = separation * g_k / ||g_k|| (g_k ~ N(0, I_p), so
    ||mu_k|| = separation and the means are nearly orthogonal for p >> K) and samples mu_k + noise * N(0, I_p)."""
    K = _pos_int("num_classes", num_classes, "K", 2)
    n = _pos_int("n_per_class", n_per_class, "n")
    p = _pos_int("dim", dim, "p, the input dimension")
    if not (np.isfinite(separation) and separation > 0 and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"separation must be > 0 and noise >= 0; got {separation!r}, {noise!r}")
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, p))
    mu = separation * G / np.linalg.norm(G, axis=1, keepdims=True)
    y = np.repeat(np.arange(K), n)
    X = mu[y] + noise * rng.standard_normal((K * n, p))
    return as_dataset(X.astype(dtype), y, name=f"gaussian mixture K={K}")


def coarsen(data: Dataset, groups) -> Dataset:
    """Merge classes into superclasses: the new label of a sample of class k is ``groups[k]``; the old labels are
    kept in ``fine``. E.g. ``groups = np.arange(10) // 2`` merges the digits into 5 superclasses {0,1}, {2,3}, ...
    """
    data = _check_dataset(data)
    g = np.asarray(groups)
    if g.shape != (data.num_classes,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups must map each of the K = {data.num_classes} classes to a superclass (shape (K,), "
                         f"integers); got shape {g.shape}")
    return as_dataset(data.X.T, g[data.y], fine=data.y, name=f"{data.name} coarse")


def split(data: Dataset, test_per_class: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Random train/test split with ``test_per_class`` test samples from every class (seeded); both class-major."""
    data = _check_dataset(data)
    t = _pos_int("test_per_class", test_per_class, "test samples per class")
    rng = np.random.default_rng(seed)
    test = np.zeros(data.N, bool)
    for k in range(data.num_classes):
        idx = np.flatnonzero(data.y == k)
        if t >= idx.size:
            raise ValueError(f"test_per_class must be < {idx.size} (class {k} has {idx.size} samples); got {t}")
        test[rng.choice(idx, t, replace=False)] = True

    def part(mask, suffix):
        f = None if data.fine is None else data.fine[mask]
        return Dataset(data.X[:, mask], data.y[mask], data.num_classes, f, f"{data.name} {suffix}")

    return part(~test, "train"), part(test, "test")


# ---------------------------------------------------------------------------------------------------------------
# the network


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
    ws = tuple(_pos_int(f"widths[{i}]", w, f"d_{i + 1}, a hidden width") for i, w in enumerate(widths))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False; got {bias!r}")
    return MLPConfig(int(in_dim), ws, int(num_classes), activation, loss, bias)


def init_mlp(config: MLPConfig, key: jax.Array, scale: float = 1.0, dtype=None) -> MLPParams:
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


def network_forward(config: MLPConfig, params: MLPParams, X) -> NetworkLayers:
    """All layers of the MLP on inputs X (p x N); see `MLPConfig` for the formulas. Pure and jittable."""
    H = [X]
    Z = []
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


def _fit(loss: str, out, Y):
    N = out.shape[1]
    if loss == "mse":
        return jnp.sum((out - Y) ** 2) / (2 * N)
    return -jnp.sum(Y * jax.nn.log_softmax(out, axis=0)) / N


def _objective(config: MLPConfig, wd, params: MLPParams, X, Y, y):
    """fit(out, Y) + wd/2 sum_l ||W_l||_F^2, and (fit, training error) as aux."""
    out = network_forward(config, params, X).out
    fit = _fit(config.loss, out, Y)
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
            raise ValueError(f"snapshot index must be an integer in [-R, R) with R = {R} recorded steps "
                             f"{self.steps.tolist()}; got {i!r}")
        return jax.tree_util.tree_map(lambda a: a[int(i)], self.snapshots)


def _make_optimizer(optimizer, lr, momentum):
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "sgd":
        return optax.sgd(lr)
    if optimizer == "momentum":
        return optax.sgd(lr, momentum=momentum)
    return optax.adam(lr)


@functools.partial(jax.jit, static_argnames=("config", "steps", "batch_size", "optimizer", "momentum", "n_records"))
def _train_jit(params0, X, Y, y, key, lr, wd, slots, *, config, steps, batch_size, optimizer, momentum, n_records):
    opt = _make_optimizer(optimizer, lr, momentum)
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


def _as_key(key):
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


def _positive(name, v, allow_zero=False):
    bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v)
    if bad or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {v!r}")
    return float(v)


def train(
    data: Dataset,
    widths,
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
    record_steps=None,
    key: jax.Array | int | None = None,
    init_scale: float = 1.0,
    dtype=None,
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
    data = _check_dataset(data)
    config = _check_config(data.p, widths, data.num_classes, activation, loss, bias)
    steps = _pos_int("steps", steps, "optimiser steps")
    wd = _positive("weight_decay", weight_decay, allow_zero=True)
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an optax.GradientTransformation; "
                             f"got {optimizer!r}")
        lr = DEFAULT_LR[optimizer] if lr is None else _positive("lr", lr)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be a string in {OPTIMIZERS} or an optax.GradientTransformation; "
                        f"got {optimizer!r}")
    else:
        lr = 0.0
    momentum = _positive("momentum", momentum, allow_zero=True)
    if batch_size is not None:
        batch_size = _pos_int("batch_size", batch_size, "samples per minibatch")
        if batch_size > data.N:
            raise ValueError(f"batch_size must be <= N = {data.N}; got {batch_size}")
        if batch_size == data.N:
            batch_size = None
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
    dt = _check_dtype(np.float32 if (dtype is None and data.X.dtype == np.float32) else dtype)
    key = _as_key(key)
    k_init, k_batch = jax.random.split(key)
    params0 = init_mlp(config, k_init, _positive("init_scale", init_scale), dt)
    X = jnp.asarray(data.X, dt)
    Y = jnp.asarray(np.eye(data.num_classes)[:, data.y], dt)
    y = jnp.asarray(data.y, jnp.int32)
    params, buf, (hv, hf, he), v, fit, err = _train_jit(
        params0, X, Y, y, k_batch, jnp.asarray(lr, dt), jnp.asarray(wd, dt), jnp.asarray(slots),
        config=config, steps=steps, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
        n_records=int(rec.size),
    )
    hist = TrainHistory(np.asarray(hv), np.asarray(hf), np.asarray(he))
    finite = bool(np.all(np.isfinite(hist.loss)) and np.isfinite(float(v)))
    return TrainResult(config, params, buf, rec, hist, wd, float(v), float(fit), float(err), finite)


def _check_result(result, name="result") -> TrainResult:
    if not isinstance(result, TrainResult):
        raise TypeError(f"{name} must be a ufm.networks.TrainResult (from train); got {type(result).__name__}")
    return result


def _check_inputs(result: TrainResult, data: Dataset, name="data"):
    data = _check_dataset(data, name)
    if data.p != result.config.in_dim or data.num_classes != result.config.num_classes:
        raise ValueError(f"{name} must have p = {result.config.in_dim} inputs and K = {result.config.num_classes} "
                         f"classes like the training data; got p = {data.p}, K = {data.num_classes}")
    return data


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_jit(config, params, X):
    return network_forward(config, params, X)


def features(result: TrainResult, data: Dataset, snapshot: int = -1) -> NetworkLayers:
    """Features of every layer (`NetworkLayers`, NumPy arrays in the training dtype) of recorded snapshot
    ``snapshot`` (default: the last) on ``data`` (the training set or any set with the same p and K)."""
    result = _check_result(result)
    data = _check_inputs(result, data)
    params = result.snapshot(snapshot)
    dt = params.Ws[0].dtype
    lay = _forward_jit(result.config, params, jnp.asarray(data.X, dt))
    return jax.tree_util.tree_map(np.asarray, lay)


# ---------------------------------------------------------------------------------------------------------------
# per-layer collapse (Parker et al. 2023)


class LayerMetrics(NamedTuple):
    """Collapse metrics of every layer at every recorded step: arrays of shape (R, D + 2), rows = recorded steps,
    columns = ``layers`` = ("input", "H_1", ..., "H_D", "out") (post-activation features; "input" is X).

    Metric definitions (`ufm.metrics`, THEORY.md §5): ``nc1`` = tr(Sigma_W Sigma_B^+)/K (Papyan, Han, Donoho 2020);
    ``nc1_trace_ratio`` = tr Sigma_W / tr Sigma_B (Tirer et al. 2023); ``cdnv`` (Galanti et al. 2022);
    ``nc2_etf`` = ||G/||G||_F - (I - J/K)/sqrt(K-1)||_F for the centred class means (Zhu et al. 2021);
    ``nc2_orthogonal`` = ||G/||G||_F - I/sqrt(K)||_F for the uncentred means (bias-free and ReLU layers);
    ``equinorm``, ``equiangularity`` (std of the pairwise cosines) and ``max_angle`` = mean_{k != j}
    |cos(mu_k - mu_G, mu_j - mu_G) + 1/(K-1)| (Papyan et al. 2020) of the centred means: 0 at a simplex ETF, so
    their fall with depth is the "opening" of the angles between class means towards the ETF (Parker et al. 2023).
    (The *mean* centred cosine is not reported: it is -1/(K-1) for any equinorm means, since sum_k n_k(mu_k - mu_G)
    = 0.) ``mean_cos_uncentred`` = mean_{k != j} cos(mu_k, mu_j): near 1 for non-negative inputs and ReLU
    features at init, 0 at an orthogonal frame. ``ncc_accuracy`` = the fraction of samples whose nearest class
    mean (Euclidean, in that layer) is their own class (Papyan et al.; Rangamani et al. 2023).
    Per step (R,): ``loss`` (objective on ``data``), ``error`` (training error on ``data``), ``nc3`` (`nc3_product`
    of the last layer W_{D+1} on H_D, target "etf", or "orthogonal" for bias-free MSE) and ``nc4`` (`ncc_mismatch`
    between the network's prediction and the nearest class mean of H_D, Papyan et al.'s NC4).
    """

    steps: np.ndarray
    layers: tuple[str, ...]
    nc1: np.ndarray
    nc1_trace_ratio: np.ndarray
    cdnv: np.ndarray
    nc2_etf: np.ndarray
    nc2_orthogonal: np.ndarray
    equinorm: np.ndarray
    equiangularity: np.ndarray
    max_angle: np.ndarray
    mean_cos_uncentred: np.ndarray
    ncc_accuracy: np.ndarray
    loss: np.ndarray
    error: np.ndarray
    nc3: np.ndarray
    nc4: np.ndarray
    num_classes: int


_LAYER_FIELDS = ("nc1", "nc1_trace_ratio", "cdnv", "nc2_etf", "nc2_orthogonal", "equinorm", "equiangularity",
                 "max_angle", "mean_cos_uncentred", "ncc_accuracy")


def _mean_cos(V: np.ndarray) -> float:
    n = np.linalg.norm(V, axis=0)
    U = np.divide(V, n, out=np.zeros_like(V), where=n > 0)
    C = U.T @ U
    K = V.shape[1]
    return float(C[~np.eye(K, dtype=bool)].mean())


def _ncc_accuracy(A: np.ndarray, y: np.ndarray, M: np.ndarray) -> float:
    d2 = np.sum(M**2, axis=0)[:, None] - 2 * M.T @ A
    return float(np.mean(np.argmin(d2, axis=0) == y))


def _feature_metrics(A, y, K) -> dict[str, float]:
    A64 = np.asarray(A, np.float64)
    M, muG = _m.class_means(A64, y, K)
    Mc = M - muG[:, None]
    return {
        "nc1": _m.nc1(A, y, K),
        "nc1_trace_ratio": _m.nc1_trace_ratio(A, y, K),
        "cdnv": _m.cdnv(A, y, K),
        "nc2_etf": _m.etf_distance(Mc),
        "nc2_orthogonal": _m.orthogonal_frame_distance(M),
        "equinorm": _m.equinorm(Mc),
        "equiangularity": _m.equiangularity(Mc),
        "max_angle": _m.max_angle(Mc),
        "mean_cos_uncentred": _mean_cos(M),
        "ncc_accuracy": _ncc_accuracy(A64, y, M),
    }


def layer_metrics(result: TrainResult, data: Dataset, *, snapshots=None) -> LayerMetrics:
    """Per-layer collapse over training (Parker et al. 2023): the metrics of `LayerMetrics` for every layer
    (input, every hidden layer, output) at every recorded step (or the snapshot indices ``snapshots``), on
    ``data`` (usually the training set)."""
    result = _check_result(result)
    data = _check_inputs(result, data)
    R = result.steps.size
    idx = np.arange(R) if snapshots is None else np.atleast_1d(np.asarray(snapshots)) % R
    cfg = result.config
    K = cfg.num_classes
    D = cfg.depth
    layers = ("input",) + tuple(f"H_{l}" for l in range(1, D + 1)) + ("out",)
    vals = {f: np.zeros((idx.size, D + 2)) for f in _LAYER_FIELDS}
    loss = np.zeros(idx.size)
    err = np.zeros(idx.size)
    nc3 = np.zeros(idx.size)
    nc4 = np.zeros(idx.size)
    y = data.y
    Y = np.eye(K)[:, y]
    target = "orthogonal" if (cfg.loss == "mse" and not cfg.bias) else "etf"
    for r, i in enumerate(idx):
        lay = features(result, data, int(i))
        params = result.snapshot(int(i))
        for j, A in enumerate((*lay.H, lay.out)):
            for f, v in _feature_metrics(A, y, K).items():
                vals[f][r, j] = v
        out = np.asarray(lay.out, np.float64)
        fit = float(_fit(cfg.loss, jnp.asarray(out), jnp.asarray(Y)))
        loss[r] = fit + result.weight_decay / 2 * sum(float(np.sum(np.asarray(W, np.float64) ** 2)) for W in params.Ws)
        err[r] = float(np.mean(np.argmax(out, axis=0) != y))
        WL = np.asarray(params.Ws[-1])
        bL = None if params.bs is None else np.asarray(params.bs[-1])
        nc3[r] = _m.nc3_product(WL, lay.H[-1], y, K, target=target)
        nc4[r] = _m.ncc_mismatch(WL, lay.H[-1], y, K, b=bL)
    return LayerMetrics(result.steps[idx], layers, *(vals[f] for f in _LAYER_FIELDS), loss, err, nc3, nc4, K)


# ---------------------------------------------------------------------------------------------------------------
# the UFM beside a network


def ufm_problem(result: TrainResult, data: Dataset, *, depth: int = 1, lam_H: float | None = None):
    """The UFM with the network's K, class sizes, loss, weight decay and top ``depth`` layers.

    The last ``depth`` = L weight matrices of the network act on the features H_{D-L+1}; freeing those features
    gives ``ufm.UFM(K, class sizes, widths=(d_{D-L+1}, ..., d_D), activation, loss, bias, lam_H, lam_W=
    weight_decay)`` with activation "linear" for L = 1 (or a linear network) and "relu" otherwise, and bias "free"
    (the network's output bias is unregularised) or "none". A real network does not penalise its features; the
    default ``lam_H = weight_decay`` follows the convention of weight decay on every factor (Zhu et al. 2021;
    Súkeník et al. 2023). Only ``n lam_H`` matters (THEORY.md §0): rescale it if you prefer a per-sample penalty.
    The deep UFM has no hidden biases, so ``depth > 1`` needs a network trained with ``bias=False``.
    """
    from ._problem import UFM

    result = _check_result(result)
    data = _check_inputs(result, data)
    cfg = result.config
    L = _pos_int("depth", depth, "the number of network layers the UFM keeps")
    if L > cfg.depth:
        raise ValueError(f"depth must be <= D = {cfg.depth} (the network's hidden layers); got {L}")
    if L > 1 and cfg.bias:
        raise ValueError("depth > 1 needs a network trained with bias=False: the deep UFM has no hidden biases")
    lam_H = result.weight_decay if lam_H is None else _positive("lam_H", lam_H, allow_zero=True)
    sizes = data.class_sizes
    n = sizes[0] if len(set(sizes)) == 1 else sizes
    act = "relu" if (L > 1 and cfg.activation == "relu") else "linear"
    return UFM(num_classes=cfg.num_classes, n_per_class=n, widths=cfg.widths[cfg.depth - L:], activation=act,
               loss=cfg.loss, bias="free" if cfg.bias else "none", lam_H=lam_H, lam_W=result.weight_decay)


class UFMReference(NamedTuple):
    """The UFM beside a trained network (`ufm_reference`).

    The UFM of depth L covers the network layers ``layers`` = (H_{D-L+1}, ..., H_D, "out"): its free features H_1
    stand for the network's H_{D-L+1}, its H_j for the network's H_{D-L+j}.

    Attributes:
      problem: the `ufm.UFM` (`ufm_problem`).
      prediction: ``ufm.predict(problem)``: the closed-form optimum (``.loss``, ``.known``, ``.regime``,
        ``.structure``, ``.target_gram``, ``.sv_H`` ...).
      predicted: {layer: {metric: value}}: the `LayerMetrics` values at the predicted optimum, for the metrics the
        prediction determines (what `plot_layer_metrics` draws): NC1 = trace ratio = CDNV = 0 and NCC accuracy 1
        in every layer when within-class collapse is predicted (``regime`` "collapse", "low-rank" or "threshold");
        the class-mean geometry from ``target_gram`` ("etf": ETF distance, equinorm, equiangularity and max-angle
        0; "orthogonal": also the orthogonal-frame distance and the uncentred cosine 0, since an equinorm
        orthogonal frame, centred, is a simplex ETF: mu_k - mu_G = c (e_k - 1/K)).
      solution: a numerical ``ufm.solve`` of the problem (L-BFGS), or None with ``solve=False``.
      network: {layer: metrics} of the network on the covered layers (keys as in `LayerMetrics`).
      ufm: {layer: metrics} of the UFM solution on the same layers (None without a solution).
      sv_network: per covered feature layer, the singular values of the network's features (all N columns), the
        first layer's after the free rebalancing below (scaled by a; deeper layers do not change under it).
      sv_predicted: the predicted singular values of the UFM's H_1..H_L (``prediction.sv_H``), the same quantity.
      network_value: the UFM objective at the network's own (features H_{D-L+1}, top L weights, output bias). It
        is >= the UFM's global optimum (the UFM minimises over all features): the gap is how far the network is
        from the UFM optimum.
      network_value_balanced: the same after the free rescaling H -> a H, W -> W / a of the first covered weight,
        which leaves the network's function unchanged, with the best a, a^4 = lam_W ||W||^2 / (lam_H ||H||^2) (the
        network never pays lam_H, so its raw feature norm is arbitrary). Also >= the UFM optimum.
      layers: the covered network layers, e.g. ("H_4", "out").
    """

    problem: Any
    prediction: Any
    predicted: dict
    solution: Any
    network: dict
    ufm: dict | None
    sv_network: tuple
    sv_predicted: tuple
    network_value: float
    network_value_balanced: float
    layers: tuple[str, ...]


def _ufm_params(result: TrainResult, data: Dataset, L: int, snapshot: int = -1):
    from ._model import Params

    params = result.snapshot(snapshot)
    lay = features(result, data, snapshot)
    D = result.config.depth
    H = jnp.asarray(lay.H[D - L + 1])
    b = None if params.bs is None else params.bs[-1]
    return Params(H, tuple(params.Ws[D + 1 - L:]), b), lay


_COLLAPSED = ("collapse", "low-rank", "threshold")


def _predicted_values(prediction, layers: tuple[str, ...]) -> dict:
    """Metric values at the predicted optimum, per covered layer (see `UFMReference.predicted`)."""
    out = {name: {} for name in layers}
    if prediction is None:
        return out
    for name in layers:
        if prediction.regime in _COLLAPSED:
            out[name].update(nc1=0.0, nc1_trace_ratio=0.0, cdnv=0.0, ncc_accuracy=1.0)
    for j, target in enumerate(prediction.target_gram):
        vals = out[layers[j]]
        if target in ("etf", "orthogonal"):
            vals.update(nc2_etf=0.0, equinorm=0.0, equiangularity=0.0, max_angle=0.0)
        if target == "orthogonal":
            vals.update(nc2_orthogonal=0.0, mean_cos_uncentred=0.0)
        if target == "orthogonal-unequal":
            vals.update(mean_cos_uncentred=0.0)
    return out


def ufm_reference(result: TrainResult, data: Dataset, *, depth: int = 1, lam_H: float | None = None,
                  solve: bool = True, key: jax.Array | int | None = None, max_steps: int = 5000) -> UFMReference:
    """The UFM prediction for the network's K, class sizes, depth and weight decay (`ufm_problem`), beside the
    network's own metrics on the layers the UFM stands for, ready to plot (`plot_layer_metrics(..., reference=)`).

    ``data`` must be the training set (the UFM objective is evaluated on the network's training features).
    ``solve=True`` also solves the UFM numerically (``ufm.solve``, L-BFGS from ``key``, at most ``max_steps``
    steps) and reports the metrics of its optimum; ``lam_H`` as in `ufm_problem`.
    """
    import ufm as _ufm

    from ._model import forward, objective
    from ._theory import predict

    result = _check_result(result)
    data = _check_inputs(result, data)
    problem = ufm_problem(result, data, depth=depth, lam_H=lam_H)
    if not np.array_equal(problem.labels(), data.y):
        raise ValueError("data must be class-major (as from as_dataset) so that its columns match ufm.targets")
    L = problem.L
    D = result.config.depth
    K = result.config.num_classes
    y = data.y
    params, lay = _ufm_params(result, data, L)
    network_value = float(objective(problem, params))
    lam_H_, lam_W1 = float(problem.lam_H), float(np.asarray(problem.lam_W)[0])
    nH, nW = float(jnp.sum(params.H**2)), float(jnp.sum(params.Ws[0] ** 2))
    a = (lam_W1 * nW / (lam_H_ * nH)) ** 0.25 if (lam_H_ > 0 and nH > 0 and nW > 0) else 1.0
    params_b = params._replace(H=params.H * a, Ws=(params.Ws[0] / a,) + tuple(params.Ws[1:]))
    network_value_balanced = float(objective(problem, params_b)) if a != 1.0 else network_value
    layers = tuple(f"H_{D - L + j}" for j in range(1, L + 1)) + ("out",)
    net_feats = [lay.H[D - L + j] for j in range(1, L + 1)] + [lay.out]
    network = {name: _feature_metrics(A, y, K) for name, A in zip(layers, net_feats, strict=True)}
    sv_network = tuple(_m.singular_values(A) * (a if j == 0 else 1.0) for j, A in enumerate(net_feats[:-1]))
    prediction = predict(problem)
    sol = None
    ufm_metrics = None
    if solve:
        sol = _ufm.solve(problem, key=_as_key(key), method="lbfgs", max_steps=max_steps, dtype=params.H.dtype)
        fw = forward(problem, sol.params)
        feats = [np.asarray(h) for h in fw.H] + [np.asarray(fw.out)]
        ufm_metrics = {name: _feature_metrics(A, y, K) for name, A in zip(layers, feats, strict=True)}
    return UFMReference(problem, prediction, _predicted_values(prediction, layers), sol, network, ufm_metrics,
                        sv_network, tuple(prediction.sv_H), network_value, network_value_balanced, layers)


# ---------------------------------------------------------------------------------------------------------------
# shallow versus expressive (E & Wojtowytsch 2022)


class AffineFloor(NamedTuple):
    """The smallest NC1 any affine map of the inputs can reach (`affine_nc1_floor`).

    Attributes:
      gammas: (r,) ascending generalised eigenvalues gamma_1 <= ... <= gamma_r of the pencil (Sigma_W, Sigma_B)
        of the inputs on the directions Sigma_B sees (r = rank Sigma_B, K - 1 for generic data).
      floor: gamma_1 / K, a lower bound on NC1(V X + c 1^T) for every V, c (any rank).
      floor_full_rank: (gamma_1 + ... + gamma_r) / K, the lower bound (and the minimum) over maps whose class
        means keep rank r (every class separated, the usual case for a trained classifier).
    """

    gammas: np.ndarray
    floor: float
    floor_full_rank: float


def affine_nc1_floor(X, labels, num_classes: int | None = None, *, rtol: float = 1e-10) -> AffineFloor:
    """Lower bounds on NC1 = tr(Sigma_W Sigma_B^+)/K of features H = V X + c 1^T, over all V (d x p) and c.

    Derivation. Centring removes c; H has Sigma_W(H) = V Sigma_W V^T =: A and Sigma_B(H) = V Sigma_B V^T =: B. With
    Q an orthonormal basis of range(B) (dim r'), tr(A B^+) = tr((Q^T A Q)(Q^T B Q)^{-1}) is the sum of the r'
    generalised eigenvalues of the pencil (Q^T A Q, Q^T B Q). This pencil is the restriction of the quotient
    R(w) = w^T Sigma_W w / w^T Sigma_B w to the r'-dimensional subspace {V^T Q c}, on which Sigma_B is positive
    definite, so by Courant-Fischer its i-th eigenvalue is >= gamma_i, the i-th smallest value of the min-max of R
    over subspaces where Sigma_B > 0. Writing w = U_B S^{-1/2} a + U_0 c (U_B S U_B^T = Sigma_B, U_0 spans its null
    space) and minimising over c gives R = a^T S_c a / |a|^2 with the Schur complement

        S_c = T^T Sigma_W T - T^T Sigma_W U_0 (U_0^T Sigma_W U_0)^+ U_0^T Sigma_W T,     T = U_B S^{-1/2},

    so gamma_i are the eigenvalues of S_c. Hence NC1(H) >= (gamma_1 + ... + gamma_{r'})/K >= gamma_1/K, with
    equality for V = the top eigenvectors mapped back (the LDA projection). The same bound holds for the output
    W (V X + c) + b of a linear model: it is again affine in X. Note that the derivation is for NC1 with the
    pseudo-inverse on the exact range of Sigma_B(H); `ufm.metrics.nc1` cuts singular values below ``rtol``, which
    can only drop terms when class means nearly coincide.

    Args:
      X: p x N inputs (samples are columns). labels: (N,) in [0, K).
      rtol: eigenvalues of Sigma_B below ``rtol`` times the largest count as zero.
    """
    A, y, K = _m._prepare(X, labels, num_classes)
    M, muG = _m.class_means(A, y, K)
    N = A.shape[1]
    R = A - M[:, y]
    SW = R @ R.T / N
    Mc = M - muG[:, None]
    SB = Mc @ Mc.T / K
    e, U = np.linalg.eigh(SB)
    keep = e > rtol * e.max() if e.max() > 0 else np.zeros(e.shape, bool)
    if not np.any(keep):
        raise ValueError("the class means of X coincide: no map of X separates the classes")
    T = U[:, keep] / np.sqrt(e[keep])
    U0 = U[:, ~keep]
    S = T.T @ SW @ T
    if U0.shape[1]:
        C = T.T @ SW @ U0
        S = S - C @ np.linalg.pinv(U0.T @ SW @ U0, rcond=1e-12, hermitian=True) @ C.T
    g = np.clip(np.linalg.eigvalsh((S + S.T) / 2), 0.0, None)
    return AffineFloor(g, float(g[0] / K), float(g.sum() / K))


class CollapseRow(NamedTuple):
    """Collapse of one model on the training set: ``nc1_features`` / ``nc1_output`` (tr(Sigma_W Sigma_B^+)/K of the
    penultimate features / of the outputs), ``trace_ratio_output`` (tr Sigma_W / tr Sigma_B of the outputs),
    ``nc2_etf`` (ETF distance of the centred penultimate class means), ``error`` (training error), ``objective``
    (the training objective: fit + weight decay, plus lam_H/2 ||H||^2 for the UFM)."""

    name: str
    nc1_features: float
    nc1_output: float
    trace_ratio_output: float
    nc2_etf: float
    error: float
    objective: float


class Comparison(NamedTuple):
    """`shallow_vs_expressive`: one `CollapseRow` per model (``rows``: shallow affine features, deep ReLU MLP,
    UFM), the `AffineFloor` of the inputs, and the trained models (``shallow``, ``deep`` `TrainResult`,
    ``ufm_solution``, ``problem``)."""

    rows: tuple[CollapseRow, ...]
    floor: AffineFloor
    shallow: TrainResult
    deep: TrainResult
    ufm_solution: Any
    problem: Any


def _row(name, H, out, y, K, error, objective) -> CollapseRow:
    M, muG = _m.class_means(np.asarray(H, np.float64), y, K)
    return CollapseRow(name, _m.nc1(H, y, K), _m.nc1(out, y, K), _m.nc1_trace_ratio(out, y, K),
                       _m.etf_distance(M - muG[:, None]), float(error), float(objective))


def shallow_vs_expressive(
    data: Dataset,
    *,
    width: int = 32,
    deep_widths=(64, 64, 64, 64),
    deep: TrainResult | None = None,
    loss: str = "mse",
    bias: bool = True,
    weight_decay: float = 1e-3,
    lam_H: float | None = None,
    steps: int = 1000,
    optimizer: str = "adam",
    lr: float | None = None,
    key: jax.Array | int | None = None,
    dtype=None,
    max_steps: int = 5000,
) -> Comparison:
    """Side by side: a model whose penultimate features are tied to the data by a shallow (affine) map, a deep ReLU
    MLP, and the UFM with the same K, class sizes, loss, bias and weight decay (E & Wojtowytsch 2022).

    * "shallow": H = V X + c (width ``width``), out = W H + b, trained like `train`. Its features and outputs are
      affine in X, so their NC1 cannot fall below `affine_nc1_floor` of the inputs, however long it trains.
    * "deep": a ReLU MLP with hidden widths ``deep_widths`` (penultimate = the last hidden layer), or the
      `TrainResult` ``deep`` of a network already trained on ``data`` (its loss and bias must match).
    * "ufm": the shallow UFM (free features of width ``width``, ``lam_W = weight_decay``, ``lam_H`` default
      ``weight_decay``), solved by L-BFGS: its features and outputs collapse exactly (NC1 -> 0).

    ``max_steps`` bounds the UFM's L-BFGS solve; the other options are those of `train`.

    The shallow model and the UFM share everything but the features: the UFM's are free, the shallow model's are
    V X + c. The floor is a theorem about the shallow model, not a property of its training run.
    """
    import ufm as _ufm

    from ._model import forward

    data = _check_dataset(data)
    key = _as_key(key)
    k1, k2, k3 = jax.random.split(key, 3)
    kw = dict(loss=loss, bias=bias, weight_decay=weight_decay, steps=steps, optimizer=optimizer, lr=lr, dtype=dtype,
              record_steps=[steps])
    shallow = train(data, (width,), activation="linear", key=k1, **kw)
    if deep is None:
        deep = train(data, deep_widths, activation="relu", key=k2, **kw)
    else:
        deep = _check_result(deep, "deep")
        _check_inputs(deep, data)
        if deep.config.loss != loss or deep.config.bias != bias:
            raise ValueError(f"deep was trained with loss={deep.config.loss!r}, bias={deep.config.bias}; the "
                             f"comparison uses loss={loss!r}, bias={bias}")
    K = data.num_classes
    y = data.y
    rows = []
    for name, res in (("shallow (affine features)", shallow), ("deep ReLU MLP", deep)):
        lay = features(res, data)
        rows.append(_row(name, lay.H[-1], lay.out, y, K, res.error, res.loss))
    problem = ufm_problem(shallow, data, depth=1, lam_H=lam_H)
    sol = _ufm.solve(problem, key=k3, method="lbfgs", max_steps=max_steps, dtype=_check_dtype(dtype))
    fw = forward(problem, sol.params)
    out = np.asarray(fw.out)
    err = float(np.mean(np.argmax(out, axis=0) != problem.labels()))
    rows.append(_row("UFM", np.asarray(sol.params.H), out, problem.labels(), K, err, float(sol.value)))
    return Comparison(tuple(rows), affine_nc1_floor(data.X, y, K), shallow, deep, sol, problem)


# ---------------------------------------------------------------------------------------------------------------
# fine-grained structure (Yang, Steinhardt, Hu 2023)


class KMeans(NamedTuple):
    """`kmeans` result: ``labels`` (N,) cluster of each column, ``centers`` (d x k), ``inertia`` = sum of squared
    distances to the assigned centres (the best of the restarts), ``n_iter`` of the best restart."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int


def _kmeanspp(A, k, rng):
    N = A.shape[1]
    centers = [A[:, rng.integers(N)]]
    d2 = np.sum((A - centers[0][:, None]) ** 2, axis=0)
    for _ in range(1, k):
        tot = d2.sum()
        i = rng.choice(N, p=d2 / tot) if tot > 0 else rng.integers(N)
        centers.append(A[:, i])
        d2 = np.minimum(d2, np.sum((A - A[:, i][:, None]) ** 2, axis=0))
    return np.stack(centers, axis=1)


def _sqdist(A, C):
    return np.maximum(np.sum(A**2, axis=0)[None, :] - 2 * C.T @ A + np.sum(C**2, axis=0)[:, None], 0.0)


def kmeans(features, k: int, *, restarts: int = 10, max_iter: int = 300, seed: int = 0) -> KMeans:
    """Lloyd's k-means on the columns of ``features`` (d x N), k-means++ seeding (Arthur & Vassilvitskii 2007), the
    best of ``restarts`` runs by inertia. An emptied cluster is re-seeded at the point farthest from its centre.

    Written in NumPy rather than taken from scikit-learn so that the fine-grained experiment runs without the
    optional dependency and is reproducible from ``seed`` alone (scikit-learn's default init also changed across
    versions); for the few hundred points per superclass used here the cost is negligible.
    """
    A = _m._matrix(features, "features")
    k = _pos_int("k", k, "number of clusters")
    if k > A.shape[1]:
        raise ValueError(f"k must be <= N = {A.shape[1]} (the columns of features); got {k}")
    restarts = _pos_int("restarts", restarts, "k-means restarts")
    max_iter = _pos_int("max_iter", max_iter, "Lloyd iterations")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        C = _kmeanspp(A, k, rng)
        lab = np.full(A.shape[1], -1)
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            d2 = _sqdist(A, C)
            new = np.argmin(d2, axis=0)
            if np.array_equal(new, lab):
                break
            lab = new
            for j in range(k):
                mask = lab == j
                if mask.any():
                    C[:, j] = A[:, mask].mean(axis=1)
                else:
                    far = int(np.argmax(d2[lab, np.arange(A.shape[1])]))
                    C[:, j] = A[:, far]
                    lab[far] = j
        inertia = float(np.sum((A - C[:, lab]) ** 2))
        if best is None or inertia < best.inertia:
            best = KMeans(lab.copy(), C.copy(), inertia, n_iter)
    return best


def cluster_accuracy(clusters, labels) -> tuple[float, dict[int, int]]:
    """Accuracy of the best one-to-one matching of clusters to labels (Hungarian algorithm on the contingency table,
    `scipy.optimize.linear_sum_assignment`): max over matchings pi of (1/N) #{i: pi(cluster_i) = label_i}.
    Returns the accuracy and the matching {cluster: label}; unmatched clusters count as errors."""
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(clusters)
    t = np.asarray(labels)
    if c.shape != t.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"clusters and labels must be 1-D of the same length N; got {c.shape} and {t.shape}")
    cu, ci = np.unique(c, return_inverse=True)
    tu, ti = np.unique(t, return_inverse=True)
    table = np.zeros((cu.size, tu.size), np.int64)
    np.add.at(table, (ci, ti), 1)
    r, s = linear_sum_assignment(table, maximize=True)
    return float(table[r, s].sum() / c.size), {int(cu[i]): int(tu[j]) for i, j in zip(r, s, strict=True)}


class FineGrained(NamedTuple):
    """`fine_grained` result (all accuracies on the evaluation set).

    Attributes:
      accuracy: fine labels recovered by clustering the coarse network's final penultimate features within each
        superclass (k-means, best matching per superclass), over all samples.
      per_group: (G,) the same within each superclass.
      predicted: (N,) the recovered fine label of every sample (-1 where a cluster was left unmatched).
      steps: (R,) the coarse network's recorded steps.
      accuracy_by_step: (R,) the recovery accuracy at each recorded step: collapse (NC1 -> 0 on the superclasses)
        erases the fine structure, so this falls late in training.
      nc1_by_step: (R,) NC1 of the penultimate features on the superclass labels at each recorded step.
      chance: the accuracy of putting a whole superclass in one cluster (its largest fine class), the trivial
        baseline (0.5 for balanced pairs).
      input_accuracy: the same clustering on the raw inputs X (how much of the structure the data already had).
      fine_accuracy: the accuracy on the fine labels of the same network trained on the fine labels.
      coarse_accuracy: the coarse network's accuracy on the superclasses.
      coarse, fine: the two `TrainResult`s.
    """

    accuracy: float
    per_group: np.ndarray
    predicted: np.ndarray
    steps: np.ndarray
    accuracy_by_step: np.ndarray
    nc1_by_step: np.ndarray
    chance: float
    input_accuracy: float
    fine_accuracy: float
    coarse_accuracy: float
    coarse: TrainResult
    fine: TrainResult


def _cluster_within(A, coarse, fine, restarts, seed):
    groups = np.unique(coarse)
    pred = np.zeros_like(fine)
    per = np.zeros(groups.size)
    for gi, g in enumerate(groups):
        mask = coarse == g
        fl = fine[mask]
        k = np.unique(fl).size
        km = kmeans(A[:, mask], k, restarts=restarts, seed=seed + gi)
        acc, match = cluster_accuracy(km.labels, fl)
        per[gi] = acc
        pred[mask] = np.array([match.get(int(c), -1) for c in km.labels])
    return float(np.mean(pred == fine)), per, pred


def fine_grained(
    data: Dataset,
    widths,
    *,
    eval_data: Dataset | None = None,
    restarts: int = 10,
    seed: int = 0,
    key: jax.Array | int | None = None,
    **train_kwargs,
) -> FineGrained:
    """Fine-grained structure under coarse labels (Yang, Steinhardt, Hu 2023).

    ``data`` has superclass labels ``y`` and the original labels ``fine`` (`coarsen`). Train the MLP on ``y``
    (`train`, with ``train_kwargs``); for each superclass, cluster the penultimate features H_D of its samples into
    as many clusters as it has fine classes (`kmeans`, no labels used) and score the best matching of clusters to
    fine labels (`cluster_accuracy`), at the end and at every recorded step. Compare with the same network (same
    widths, init key and training options) trained on the fine labels, with the same clustering of the raw inputs,
    and with the trivial one-cluster-per-superclass baseline. Scores are on ``eval_data`` (default: the training
    set; pass a held-out split from `split` to compare generalisation).
    """
    data = _check_dataset(data)
    if data.fine is None:
        raise ValueError("data must carry fine labels: build it with coarsen(dataset, groups)")
    ev = data if eval_data is None else _check_dataset(eval_data, "eval_data")
    if ev.fine is None or ev.p != data.p or ev.num_classes != data.num_classes:
        raise ValueError("eval_data must have the same inputs p, superclasses and fine labels (split a coarsened "
                         "dataset)")
    key = _as_key(key)
    coarse = train(data, widths, key=key, **train_kwargs)
    fine_data = as_dataset(data.X.T, data.fine, name=f"{data.name} fine")
    fine_net = train(fine_data, widths, key=key, **train_kwargs)
    R = coarse.steps.size
    acc_by = np.zeros(R)
    nc1_by = np.zeros(R)
    for r in range(R):
        H = np.asarray(features(coarse, ev, r).H[-1], np.float64)
        acc_by[r], per, pred = _cluster_within(H, ev.y, ev.fine, restarts, seed)
        nc1_by[r] = _m.nc1(H, ev.y, ev.num_classes)
    lay = features(coarse, ev)
    in_acc, _, _ = _cluster_within(np.asarray(ev.X, np.float64), ev.y, ev.fine, restarts, seed)
    chance = sum(np.bincount(ev.fine[ev.y == g]).max() for g in np.unique(ev.y)) / ev.N
    coarse_acc = float(np.mean(np.argmax(lay.out, axis=0) == ev.y))
    ev_fine = as_dataset(ev.X.T, ev.fine)
    out_f = features(fine_net, ev_fine).out
    fine_acc = float(np.mean(np.argmax(out_f, axis=0) == ev_fine.y))
    return FineGrained(float(acc_by[-1]), per, pred, coarse.steps, acc_by, nc1_by, float(chance), in_acc, fine_acc,
                       coarse_acc, coarse, fine_net)


# ---------------------------------------------------------------------------------------------------------------
# plots (matplotlib imported lazily; figures are returned, never shown)


def plot_layer_metrics(metrics: LayerMetrics, *, names=("nc1", "nc1_trace_ratio", "max_angle", "ncc_accuracy"),
                       reference: UFMReference | None = None, log=("nc1", "nc1_trace_ratio", "cdnv")):
    """One panel per metric: its value against the layer, one line per recorded step (darker = later), with the
    UFM prediction's value (``reference`` from `ufm_reference`: its ``predicted`` dict) as black stars on the
    layers the UFM stands for (a predicted 0 on a log axis is a triangle on the bottom edge). Returns the matplotlib
    Figure (never calls show)."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    x = np.arange(len(metrics.layers))
    R = metrics.steps.size
    cmap = plt.get_cmap("viridis")
    for ax, f in zip(axes[0], names, strict=True):
        vals = getattr(metrics, f)
        for r in range(R):
            ax.plot(x, vals[r], "o-", ms=3, color=cmap(r / max(R - 1, 1)), label=f"step {metrics.steps[r]}"
                    if r in (0, R - 1) else None)
        if reference is not None:
            pts = [(metrics.layers.index(n), v[f]) for n, v in reference.predicted.items()
                   if f in v and n in metrics.layers]
            on_axis = [(xv, v) for xv, v in pts if not (f in log and v <= 0)]
            at_zero = [xv for xv, v in pts if f in log and v <= 0]
            if on_axis:
                xs, vs = zip(*on_axis, strict=True)
                ax.plot(xs, vs, "k*", ms=9, ls="none", label="UFM prediction")
            if at_zero:  # a predicted 0 on a log axis: a marker on the bottom edge
                tr = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(at_zero, [0.0] * len(at_zero), "kv", ms=8, ls="none", transform=tr, clip_on=False,
                        label="UFM prediction: 0")
        if f in log:
            ax.set_yscale("log")
        ax.set_xticks(x, metrics.layers, rotation=45)
        ax.set_title(f)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_comparison(comparison: Comparison):
    """Bar chart of NC1 of the penultimate features and of the outputs for each model of `shallow_vs_expressive`,
    with the affine floor (the NC1 no affine feature map can beat) as a line. Returns the Figure."""
    import matplotlib.pyplot as plt

    rows = comparison.rows
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(rows))
    tiny = 1e-16
    ax.bar(x - 0.2, [max(r.nc1_features, tiny) for r in rows], 0.4, label="NC1 penultimate")
    ax.bar(x + 0.2, [max(r.nc1_output, tiny) for r in rows], 0.4, label="NC1 output")
    ax.axhline(comparison.floor.floor_full_rank, color="k", ls="--", lw=1, label="affine floor (rank K-1)")
    ax.set_yscale("log")
    ax.set_xticks(x, [r.name for r in rows])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
