"""Experiments that hold a trained network against the UFM: the matching UFM, shallow versus expressive models,
fine-grained structure under coarse labels.

* `ufm_problem` / `ufm_reference`: the UFM with the network's K, class sizes, depth and weight decay, its
  prediction and numerical optimum beside the network's own metrics (Parker et al. 2023).
* `shallow_vs_expressive` (E & Wojtowytsch 2022): affine features, a deep ReLU MLP and the UFM side by side.
* `fine_grained` (Yang, Steinhardt, Hu 2023): train on superclasses, cluster within each, score the fine labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import DTypeLike

from .. import UFM, Params, forward, metrics, objective, predict
from .. import solve as solve_ufm
from .._options import check_dtype
from ._args import as_key, positive, positive_int
from .data import Dataset, as_dataset, check_dataset
from .measures import AffineFloor, affine_nc1_floor, cluster_accuracy, feature_metrics, kmeans
from .mlp import TrainResult, check_inputs, check_result, features, train

__all__ = [
    "ufm_problem",
    "UFMReference",
    "ufm_reference",
    "CollapseRow",
    "Comparison",
    "shallow_vs_expressive",
    "FineGrained",
    "fine_grained",
]


def ufm_problem(result: TrainResult, data: Dataset, *, depth: int = 1, lam_H: float | None = None) -> UFM:
    """The UFM with the network's K, class sizes, loss, weight decay and top ``depth`` layers.

    The last ``depth`` = L weight matrices of the network act on the features H_{D-L+1}; freeing those features
    gives ``ufm.UFM(K, class sizes, widths=(d_{D-L+1}, ..., d_D), activation, loss, bias, lam_H, lam_W=
    weight_decay)`` with activation "linear" for L = 1 (or a linear network) and "relu" otherwise, and bias "free"
    (the network's output bias is unregularised) or "none". A real network does not penalise its features; the
    default ``lam_H = weight_decay`` follows the convention of weight decay on every factor (Zhu et al. 2021;
    Súkeník et al. 2023). Only ``n lam_H`` matters (THEORY.md §0): rescale it if you prefer a per-sample penalty.
    The deep UFM has no hidden biases, so ``depth > 1`` needs a network trained with ``bias=False``.
    """
    result = check_result(result)
    data = check_inputs(result, data)
    cfg = result.config
    L = positive_int("depth", depth, "the number of network layers the UFM keeps")
    if L > cfg.depth:
        raise ValueError(f"depth must be <= D = {cfg.depth} (the network's hidden layers); got {L}")
    if L > 1 and cfg.bias:
        raise ValueError("depth > 1 needs a network trained with bias=False: the deep UFM has no hidden biases")
    lam_H = result.weight_decay if lam_H is None else positive("lam_H", lam_H, allow_zero=True)
    sizes = data.class_sizes
    n = sizes[0] if len(set(sizes)) == 1 else sizes
    act = "relu" if (L > 1 and cfg.activation == "relu") else "linear"
    return UFM(
        num_classes=cfg.num_classes,
        n_per_class=n,
        widths=cfg.widths[cfg.depth - L :],
        activation=act,
        loss=cfg.loss,
        bias="free" if cfg.bias else "none",
        lam_H=lam_H,
        lam_W=result.weight_decay,
    )


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
    params = result.snapshot(snapshot)
    lay = features(result, data, snapshot)
    D = result.config.depth
    H = jnp.asarray(lay.H[D - L + 1])
    b = None if params.bs is None else params.bs[-1]
    return Params(H, tuple(params.Ws[D + 1 - L :]), b), lay


_COLLAPSED = ("collapse", "low-rank", "threshold")


def _predicted_values(prediction, layers: tuple[str, ...]) -> dict:
    """Metric values at the predicted optimum, per covered layer (see `UFMReference.predicted`)."""
    out: dict[str, dict[str, float]] = {name: {} for name in layers}
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


def ufm_reference(
    result: TrainResult,
    data: Dataset,
    *,
    depth: int = 1,
    lam_H: float | None = None,
    solve: bool = True,
    key: jax.Array | int | None = None,
    max_steps: int = 5000,
) -> UFMReference:
    """The UFM prediction for the network's K, class sizes, depth and weight decay (`ufm_problem`), beside the
    network's own metrics on the layers the UFM stands for, ready to plot (`plot_layer_metrics(..., reference=)`).

    ``data`` must be the training set (the UFM objective is evaluated on the network's training features).
    ``solve=True`` also solves the UFM numerically (``ufm.solve``, L-BFGS from ``key``, at most ``max_steps``
    steps) and reports the metrics of its optimum; ``lam_H`` as in `ufm_problem`.
    """
    result = check_result(result)
    data = check_inputs(result, data)
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
    network = {name: feature_metrics(A, y, K) for name, A in zip(layers, net_feats, strict=True)}
    sv_network = tuple(metrics.singular_values(A) * (a if j == 0 else 1.0) for j, A in enumerate(net_feats[:-1]))
    prediction = predict(problem)
    sol = None
    ufm_metrics = None
    if solve:
        sol = solve_ufm(problem, key=as_key(key), method="lbfgs", max_steps=max_steps, dtype=params.H.dtype)
        fw = forward(problem, sol.params)
        feats = [np.asarray(h) for h in fw.H] + [np.asarray(fw.out)]
        ufm_metrics = {name: feature_metrics(A, y, K) for name, A in zip(layers, feats, strict=True)}
    return UFMReference(
        problem,
        prediction,
        _predicted_values(prediction, layers),
        sol,
        network,
        ufm_metrics,
        sv_network,
        tuple(prediction.sv_H),
        network_value,
        network_value_balanced,
        layers,
    )


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
    M, muG = metrics.class_means(np.asarray(H, np.float64), y, K)
    return CollapseRow(
        name,
        metrics.nc1(H, y, K),
        metrics.nc1(out, y, K),
        metrics.nc1_trace_ratio(out, y, K),
        metrics.etf_distance(M - muG[:, None]),
        float(error),
        float(objective),
    )


def shallow_vs_expressive(
    data: Dataset,
    *,
    width: int = 32,
    deep_widths: Sequence[int] = (64, 64, 64, 64),
    deep: TrainResult | None = None,
    loss: str = "mse",
    bias: bool = True,
    weight_decay: float = 1e-3,
    lam_H: float | None = None,
    steps: int = 1000,
    optimizer: str = "adam",
    lr: float | None = None,
    key: jax.Array | int | None = None,
    dtype: DTypeLike | None = None,
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
    data = check_dataset(data)
    key = as_key(key)
    k1, k2, k3 = jax.random.split(key, 3)
    kw: dict[str, Any] = dict(
        loss=loss,
        bias=bias,
        weight_decay=weight_decay,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        dtype=dtype,
        record_steps=[steps],
    )
    shallow = train(data, (width,), activation="linear", key=k1, **kw)
    if deep is None:
        deep = train(data, deep_widths, activation="relu", key=k2, **kw)
    else:
        deep = check_result(deep, "deep")
        check_inputs(deep, data)
        if deep.config.loss != loss or deep.config.bias != bias:
            raise ValueError(
                f"deep was trained with loss={deep.config.loss!r}, bias={deep.config.bias}; the "
                f"comparison uses loss={loss!r}, bias={bias}"
            )
    K = data.num_classes
    y = data.y
    rows = []
    for name, res in (("shallow (affine features)", shallow), ("deep ReLU MLP", deep)):
        lay = features(res, data)
        rows.append(_row(name, lay.H[-1], lay.out, y, K, res.error, res.loss))
    problem = ufm_problem(shallow, data, depth=1, lam_H=lam_H)
    sol = solve_ufm(problem, key=k3, method="lbfgs", max_steps=max_steps, dtype=check_dtype(dtype))
    fw = forward(problem, sol.params)
    out = np.asarray(fw.out)
    err = float(np.mean(np.argmax(out, axis=0) != problem.labels()))
    rows.append(_row("UFM", np.asarray(sol.params.H), out, problem.labels(), K, err, float(sol.value)))
    return Comparison(tuple(rows), affine_nc1_floor(data.X, y, K), shallow, deep, sol, problem)


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
    widths: int | Sequence[int],
    *,
    eval_data: Dataset | None = None,
    restarts: int = 10,
    seed: int = 0,
    key: jax.Array | int | None = None,
    **train_kwargs: Any,
) -> FineGrained:
    """Fine-grained structure under coarse labels (Yang, Steinhardt, Hu 2023).

    ``data`` has superclass labels ``y`` and the original labels ``fine`` (`coarsen`). Train the MLP on ``y``
    (`train`, with ``train_kwargs``); for each superclass, cluster the penultimate features H_D of its samples into
    as many clusters as it has fine classes (`kmeans`, no labels used) and score the best matching of clusters to
    fine labels (`cluster_accuracy`), at the end and at every recorded step. Compare with the same network (same
    widths, init key and training options) trained on the fine labels, with the same clustering of the raw inputs,
    and with the trivial one-cluster-per-superclass baseline. Scores are on ``eval_data`` (default: the training
    set; pass a held-out split from `split` to compare generalisation). The clustering needs scikit-learn
    (``pip install 'ufm[networks]'``).
    """
    data = check_dataset(data)
    if data.fine is None:
        raise ValueError("data must carry fine labels: build it with coarsen(dataset, groups)")
    ev = data if eval_data is None else check_dataset(eval_data, "eval_data")
    if ev.fine is None or ev.p != data.p or ev.num_classes != data.num_classes:
        raise ValueError(
            "eval_data must have the same inputs p, superclasses and fine labels (split a coarsened dataset)"
        )
    key = as_key(key)
    coarse = train(data, widths, key=key, **train_kwargs)
    fine_data = as_dataset(data.X.T, data.fine, name=f"{data.name} fine")
    fine_net = train(fine_data, widths, key=key, **train_kwargs)
    R = coarse.steps.size
    acc_by = np.zeros(R)
    nc1_by = np.zeros(R)
    for r in range(R):
        H = np.asarray(features(coarse, ev, r).H[-1], np.float64)
        acc_by[r], per, pred = _cluster_within(H, ev.y, ev.fine, restarts, seed)
        nc1_by[r] = metrics.nc1(H, ev.y, ev.num_classes)
    lay = features(coarse, ev)
    in_acc, _, _ = _cluster_within(np.asarray(ev.X, np.float64), ev.y, ev.fine, restarts, seed)
    chance = sum(np.bincount(ev.fine[ev.y == g]).max() for g in np.unique(ev.y)) / ev.N
    coarse_acc = float(np.mean(np.argmax(lay.out, axis=0) == ev.y))
    ev_fine = as_dataset(ev.X.T, ev.fine)
    out_f = features(fine_net, ev_fine).out
    fine_acc = float(np.mean(np.argmax(out_f, axis=0) == ev_fine.y))
    return FineGrained(
        float(acc_by[-1]),
        per,
        pred,
        coarse.steps,
        acc_by,
        nc1_by,
        float(chance),
        in_acc,
        fine_acc,
        coarse_acc,
        coarse,
        fine_net,
    )
