"""The problem definition: an unconstrained features model (UFM) as an immutable pytree.

Shapes and modes (K, class sizes, widths, activation, loss, bias) are *static* metadata: changing them
recompiles. The regularisation strengths and the label-smoothing level are *array leaves*: changing them
does not recompile, and a batch of problems is a `vmap` over them.

Notation follows `THEORY.md` §0: K classes, n_k samples in class k, N = sum n_k, columns of H are samples
in class-major order, W_l is d_{l+1} x d_l with d_{L+1} = K.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("linear", "relu")
LOSSES = ("mse", "ce")
BIASES = ("none", "free", "reg")


MAX_DIM = 2**31 - 1  # the largest class count, class size or width accepted (an int32 dimension)


def is_concrete(x: Any) -> bool:
    """True when ``x`` is a concrete value (not a JAX tracer): only concrete values are validated."""
    return not isinstance(x, jax.core.Tracer)


def _check_int(name: str, value: Any, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer ({what}); got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} ({what}); got {value}")
    if value > MAX_DIM:
        raise ValueError(f"{name} must be <= {MAX_DIM} ({what}); got {value}")
    return int(value)


def _check_lam(name: str, value: Any, shape_hint: str, max_ndim: int = 0, what: str = "a weight-decay strength"):
    """Validate a number leaf: a real, finite, non-negative scalar (``max_ndim=0``) or vector (``max_ndim=1``).
    Tracers (inside jit/vmap) are not checked; `ufm.solve_batch` validates batched values itself."""
    if value is None:
        raise TypeError(f"{name} must be a non-negative number {shape_hint}; got None")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a non-negative number {shape_hint}; got {value!r}")
    if is_concrete(value):
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as e:  # ragged lists and the like
            raise TypeError(f"{name} must be a non-negative number {shape_hint}; got {value!r} ({e})") from None
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} must be a non-negative number {shape_hint}; got dtype {arr.dtype}")
        if arr.ndim > max_ndim:
            batch = " (for a batch of values use ufm.solve_batch or ufm.sweep)"
            raise ValueError(
                f"{name} must be {'a scalar' if max_ndim == 0 else 'a scalar or a vector'} "
                f"{shape_hint}; got shape {arr.shape}{batch}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite; got {value!r}")
        if np.any(arr < 0):
            raise ValueError(f"{name} must be >= 0 ({what}); got {value!r}")
    out = jnp.asarray(value)
    if not jnp.issubdtype(out.dtype, jnp.floating):
        out = out.astype(jnp.result_type(float))
    return out


class UFM:
    """An unconstrained features model: free features H followed by L layers.

    The objective (`THEORY.md` §0, §4) is

        f(H, W_1..W_L, b) = fit(Out, Y) + sum_l lam_W[l]/2 ||W_l||_F^2 + lam_H/2 ||H||_F^2 + lam_b/2 ||b||^2,

        Out = W_L s(W_{L-1} s( ... s(W_1 H))) + b 1_N^T,

    with s = identity (``activation="linear"``) or ReLU (``"relu"``) applied after W_1..W_{L-1} only
    (not to H, not to the output), and

    * ``loss="mse"``: fit = 1/(2N) ||Out - Y||_F^2 (Zhou et al. 2022; Súkeník et al. 2023; Dang et al. 2023);
    * ``loss="ce"``:  fit = 1/N sum_i CE(out_i, t_i) with CE(z, t) = -sum_j t_j log softmax(z)_j,
      t = (1 - alpha) e_y + alpha/K 1 (alpha = ``label_smoothing``; Zhu et al. 2021; Guo et al. 2024).

    The lambdas are *not* divided by N and H is penalised as a whole, so n enters the optimum only
    through n * lam_H (THEORY.md §0, §7.2).

    Args:
      num_classes: K >= 2.
      n_per_class: n (balanced) or a tuple (n_1, ..., n_K) of class sizes, each >= 1.
      widths: (d_1, ..., d_L): d_1 is the feature dimension (H is d_1 x N) and d_l the input width of
        W_l, so L = len(widths); W_L is K x d_L. ``widths=(d,)`` is the shallow UFM.
      activation: "linear" or "relu".
      loss: "mse" or "ce".
      bias: "none" (no b), "free" (b unregularised) or "reg" (b penalised with lam_b > 0).
      lam_H: lambda_H >= 0.
      lam_W: lambda_W >= 0, a scalar (all layers) or one per layer (length L).
      lam_b: lambda_b; must be > 0 with ``bias="reg"`` and 0 otherwise.
      label_smoothing: alpha in [0, 1); only with ``loss="ce"``.

    Example:
      >>> import ufm
      >>> p = ufm.UFM(num_classes=3, n_per_class=4, widths=(8, 8), activation="relu",
      ...             loss="mse", bias="none", lam_H=1e-3, lam_W=1e-3)
      >>> p.L, p.N, p.param_shapes()
      (2, 12, ((8, 12), ((8, 8), (3, 8)), None))
    """

    num_classes: int
    n_per_class: int | tuple[int, ...]
    widths: tuple[int, ...]
    activation: str
    loss: str
    bias: str
    lam_H: jax.Array
    lam_W: jax.Array
    lam_b: jax.Array
    label_smoothing: jax.Array

    __slots__ = (
        "num_classes",
        "n_per_class",
        "widths",
        "activation",
        "loss",
        "bias",
        "lam_H",
        "lam_W",
        "lam_b",
        "label_smoothing",
    )

    def __init__(
        self,
        num_classes: int,
        n_per_class: int | tuple[int, ...],
        widths: int | tuple[int, ...],
        activation: str = "linear",
        loss: str = "mse",
        bias: str = "none",
        lam_H: Any = 1e-3,
        lam_W: Any = 1e-3,
        lam_b: Any = 0.0,
        label_smoothing: Any = 0.0,
    ):
        K = _check_int("num_classes", num_classes, 2, "K, the number of classes")
        if isinstance(n_per_class, numbers.Integral) and not isinstance(n_per_class, bool):
            ns: tuple[int, ...] | int = _check_int("n_per_class", n_per_class, 1, "n, samples per class")
        elif isinstance(n_per_class, (tuple, list, np.ndarray)):
            if len(n_per_class) != K:
                raise ValueError(
                    f"n_per_class must be an integer n or a sequence (n_1, ..., n_K) of K={K} class sizes; "
                    f"got {len(n_per_class)} sizes"
                )
            ns = tuple(_check_int(f"n_per_class[{k}]", v, 1, "a class size n_k") for k, v in enumerate(n_per_class))
            if len(set(ns)) == 1:
                ns = ns[0]
        else:
            raise TypeError(f"n_per_class must be an integer n or a sequence of K class sizes; got {n_per_class!r}")
        if isinstance(widths, numbers.Integral) and not isinstance(widths, bool):
            widths = (widths,)
        elif isinstance(widths, np.ndarray) and widths.ndim == 1:
            widths = tuple(widths.tolist())
        if not isinstance(widths, (tuple, list)) or len(widths) == 0:
            raise TypeError(f"widths must be a non-empty sequence (d_1, ..., d_L) of positive integers; got {widths!r}")
        ws = tuple(_check_int(f"widths[{i}]", w, 1, f"d_{i + 1}, a layer width") for i, w in enumerate(widths))
        L = len(ws)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
        if bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}; got {bias!r}")
        lH = _check_lam("lam_H", lam_H, "(lambda_H)")
        lW = _check_lam("lam_W", lam_W, f"(lambda_W: a scalar or shape (L,) = ({L},), one per layer)", max_ndim=1)
        if lW.ndim == 0:
            lW = jnp.broadcast_to(lW, (L,))
        elif lW.shape[-1] != L and is_concrete(lam_W):
            raise ValueError(f"lam_W must be a scalar or have one entry per layer (L={L}); got shape {lW.shape}")
        lb = _check_lam("lam_b", lam_b, "(lambda_b)")
        if is_concrete(lam_b):
            if bias == "reg" and np.any(np.asarray(lam_b) <= 0):
                raise ValueError(
                    f"bias='reg' needs lam_b > 0; got lam_b={lam_b!r} (use bias='free' for an unregularised bias)"
                )
            if bias != "reg" and np.any(np.asarray(lam_b) != 0):
                raise ValueError(f"lam_b={lam_b!r} is only used with bias='reg'; got bias={bias!r}")
        ls = _check_lam("label_smoothing", label_smoothing, "(alpha in [0, 1))", what="alpha in [0, 1)")
        if is_concrete(label_smoothing):
            if np.any(np.asarray(label_smoothing) >= 1):
                raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
            if loss != "ce" and np.any(np.asarray(label_smoothing) != 0):
                raise ValueError(f"label_smoothing is only defined for loss='ce'; got loss={loss!r}")
        object.__setattr__(self, "num_classes", K)
        object.__setattr__(self, "n_per_class", ns)
        object.__setattr__(self, "widths", ws)
        object.__setattr__(self, "activation", activation)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "lam_H", lH)
        object.__setattr__(self, "lam_W", lW)
        object.__setattr__(self, "lam_b", lb)
        object.__setattr__(self, "label_smoothing", ls)

    def __setattr__(self, name, value):
        raise AttributeError("UFM is immutable; use problem.replace(field=value)")

    # ----- derived static quantities -----
    @property
    def K(self) -> int:
        return self.num_classes

    @property
    def L(self) -> int:
        """Number of weight matrices W_1..W_L."""
        return len(self.widths)

    @property
    def class_sizes(self) -> tuple[int, ...]:
        """(n_1, ..., n_K)."""
        if isinstance(self.n_per_class, int):
            return (self.n_per_class,) * self.num_classes
        return self.n_per_class

    @property
    def balanced(self) -> bool:
        return isinstance(self.n_per_class, int)

    @property
    def N(self) -> int:
        return sum(self.class_sizes)

    @property
    def has_bias(self) -> bool:
        return self.bias != "none"

    def param_shapes(self):
        """Shapes of (H, (W_1, ..., W_L), b): H is d_1 x N, W_l is d_{l+1} x d_l, b is (K,) or None."""
        dims = self.widths + (self.num_classes,)
        Ws = tuple((dims[i + 1], dims[i]) for i in range(self.L))
        return ((self.widths[0], self.N), Ws, (self.num_classes,) if self.has_bias else None)

    def labels(self) -> np.ndarray:
        """Integer class labels of the N columns, class-major: [0]*n_1 + [1]*n_2 + ... (NumPy, static)."""
        return np.repeat(np.arange(self.num_classes), self.class_sizes)

    def replace(self, **changes) -> UFM:
        """A copy with some fields changed (validated as in the constructor).

        A per-layer ``lam_W`` is kept when ``widths`` changes but L does not; when L changes, a ``lam_W`` equal in
        every layer becomes that scalar, and a per-layer one that differs between layers must be given anew
        (``ValueError`` naming lam_W otherwise)."""
        unknown = sorted(set(changes) - set(self.__slots__))
        if unknown:
            raise TypeError(f"UFM.replace: unknown field {unknown[0]!r} (fields: {', '.join(self.__slots__)})")
        fields = {name: getattr(self, name) for name in self.__slots__}
        if "lam_W" not in changes and "widths" in changes:
            new_widths = changes["widths"]
            new_L = (
                1
                if isinstance(new_widths, numbers.Integral)
                else len(new_widths)
                if isinstance(new_widths, (tuple, list))
                else None
            )
            lam_W = fields["lam_W"]
            if new_L is not None and new_L != self.L and np.ndim(lam_W) == 1:
                if is_concrete(lam_W) and not np.all(np.asarray(lam_W) == np.asarray(lam_W)[0]):
                    raise ValueError(
                        f"UFM.replace: widths changes L from {self.L} to {new_L} but lam_W is per layer "
                        f"({np.asarray(lam_W).tolist()}); give lam_W too (a scalar or shape (L,) = ({new_L},))"
                    )
                fields["lam_W"] = lam_W[0]
        fields.update(changes)
        return UFM(**fields)

    @property
    def num_params(self) -> int:
        """The number of scalar parameters: d_1 N + sum_l d_{l+1} d_l (+ K with a bias)."""
        hs, ws, bs = self.param_shapes()
        return hs[0] * hs[1] + sum(a * b for a, b in ws) + (bs[0] if bs else 0)

    def static_key(self) -> tuple:
        return (self.num_classes, self.n_per_class, self.widths, self.activation, self.loss, self.bias)

    def to_dict(self) -> dict:
        """A JSON-friendly dict of every field (lambdas as Python floats / lists)."""

        def py(x):
            x = np.asarray(x)
            return x.item() if x.ndim == 0 else x.tolist()

        lam_W = np.asarray(self.lam_W)
        return dict(
            num_classes=self.num_classes,
            n_per_class=self.n_per_class if isinstance(self.n_per_class, int) else list(self.n_per_class),
            widths=list(self.widths),
            activation=self.activation,
            loss=self.loss,
            bias=self.bias,
            lam_H=py(self.lam_H),
            lam_W=py(lam_W[0]) if lam_W.ndim == 1 and np.all(lam_W == lam_W[0]) else py(lam_W),
            lam_b=py(self.lam_b),
            label_smoothing=py(self.label_smoothing),
        )

    def __repr__(self) -> str:
        try:
            d = self.to_dict()
            return "UFM(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"
        except Exception:  # traced leaves
            return f"UFM(static={self.static_key()}, <traced lambdas>)"

    # ----- pytree -----
    def _tree_flatten(self):
        return (self.lam_H, self.lam_W, self.lam_b, self.label_smoothing), self.static_key()

    @classmethod
    def _tree_unflatten(cls, static, leaves):
        obj = object.__new__(cls)
        for name, v in zip(("num_classes", "n_per_class", "widths", "activation", "loss", "bias"), static):
            object.__setattr__(obj, name, v)
        for name, v in zip(("lam_H", "lam_W", "lam_b", "label_smoothing"), leaves):
            object.__setattr__(obj, name, v)
        return obj


jax.tree_util.register_pytree_node(UFM, UFM._tree_flatten, UFM._tree_unflatten)
