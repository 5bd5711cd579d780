"""Collapse in real trained networks, held against the UFM prediction in the same notebook.

``import ufm.networks as nets`` (it is not imported by ``import ufm``). Three experiments from the papers that study
what the unconstrained features model abstracts away, on data that ships inside a package (scikit-learn's digits,
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

The package, one concept per module: `ufm.networks.data` (datasets), `ufm.networks.mlp` (the MLP and its
training), `ufm.networks.measures` (collapse measurements, the affine floor, clustering), `ufm.networks.experiments`
(the three experiments and the UFM beside a network); the figures are built in `ufm.network_plots`. Every public
name is re-exported here.
"""

from __future__ import annotations

from ..network_plots import plot_comparison, plot_layer_metrics
from .data import Dataset, as_dataset, coarsen, gaussian_mixture, load_digits, split
from .experiments import (
    CollapseRow,
    Comparison,
    FineGrained,
    UFMReference,
    fine_grained,
    shallow_vs_expressive,
    ufm_problem,
    ufm_reference,
)
from .measures import AffineFloor, KMeans, LayerMetrics, affine_nc1_floor, cluster_accuracy, kmeans, layer_metrics
from .mlp import (
    MLPConfig,
    MLPParams,
    NetworkLayers,
    TrainHistory,
    TrainResult,
    features,
    init_mlp,
    network_forward,
    train,
)

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
