"""Theory: the predicted global optimum of a UFM, as numbers (`predict`) and as parameters (`construct`).

Everything here is NumPy float64, whatever the problem's dtype, and follows `THEORY.md` (the project spec;
section numbers below refer to it). Statements marked *recalled* are theorem/figure numbers from the
papers that could not be re-read; the formulas themselves were re-derived (comments) and are tested
numerically against independent reduced problems and against the solver (tests/test_theory.py).

Conventions (THEORY §0): MSE fit 1/(2N)||Out - Y||_F^2, CE fit 1/N sum_i CE, penalties lam/2 ||.||_F^2 with H
penalised as a whole, so n enters only through n lam_H. P is the number of factors (H and L weight
matrices: P = L + 1); kappa = (lam_H prod_l lam_W_l)^{1/P}; C = (n lam_H prod lam_W)^{1/P} (balanced).

Two lemmas do all the work (THEORY §0):

* (F) factorisation: inf { sum_i mu_i/2 ||A_i||_F^2 : A_P...A_1 = Z } = (P/2)(prod mu_i)^{1/P} sum_j sigma_j(Z)^{2/P},
  attained by the balanced factorisation sigma_j(A_i) = ((prod mu)^{1/P}/mu_i)^{1/2} sigma_j(Z)^{1/P}
  (inner widths >= rank Z).
* (vN) von Neumann: ||Z - T||_F^2 >= sum_i (sigma_i(Z) - sigma_i(T))^2, so for a penalty of the singular values
  the optimal Z shares singular vectors with the target T and the problem splits into scalar problems

      phi(s) = (1 - s)^2/2 + A s^{2/P},  s >= 0         (one per singular value y of T; sigma(Z) = y s)

  with A = (P/2) N kappa y^{2/P - 2} (= (P/2) K C for a balanced class direction y = sqrt(n)).

Class coordinates (THEORY §9.0): with D = diag(n_1..n_K), E the K x N class indicator, u = sqrt(n)/sqrt(N), every
linear optimum collapses within classes and its end-to-end product is Z = B D^{-1/2} E with a K x K matrix B,
sigma(Z) = sigma(B). The bias is eliminated in closed form: MSE target T = D^{1/2} (no bias),
D^{1/2}(I - u u^T) (free bias), and a weighted fit with S = I - (1 - sqrt(mu)) u u^T, mu = lam_b/(1+lam_b),
for a regularised bias; b = -(B - D^{1/2}) sqrt(n) / (N (1 + lam_b)).

Layout (each module imports only earlier ones; `scalar` and `convex` import nothing of ufm):

* `scalar`: the master scalar problem phi and the per-class optimum;
* `convex`: the convex nuclear-norm programs (NumPy), solved and certified by a duality gap;
* `srg`: the strongly-regular-graph family of the deep ReLU UFM;
* `prediction`: the `Prediction` record, references, input handling;
* `linear`: linear models in class coordinates (closed forms and convex reductions);
* `deep_relu`: DNC and SRG points of the deep ReLU UFM;
* `api`: `predict` and `construct`.
"""

from .api import construct, predict
from .convex import ConvexCertificate
from .deep_relu import srg_params
from .prediction import Prediction
from .scalar import phi_min, phi_threshold
from .srg import srg_ratio

__all__ = [
    "ConvexCertificate",
    "Prediction",
    "construct",
    "phi_min",
    "phi_threshold",
    "predict",
    "srg_params",
    "srg_ratio",
]
