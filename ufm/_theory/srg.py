"""Deep ReLU UFM with K = r(r-1)/2 classes: the strongly-regular-graph (SRG) family of candidate points.

Súkeník, Lampert, Mondelli 2024 (NeurIPS), "Neural collapse versus low-rank bias: is deep neural collapse
really optimal?" show that for the L-layer ReLU deep UFM (DUFM) with MSE loss the deep-neural-collapse (DNC)
point stops being optimal beyond two layers or two classes, and exhibit lower-loss points built on strongly
regular graphs: the K = C(r, 2) classes are the edges of the complete graph K_r (their Fig. 1: L = 4, K = 10,
r = 5, M_3 with r-1 equal nonzeros per row, rank(M_4) = r before the ReLU and K after it; Fig. 3 left: L_SRG/L_DNC
against r for L = 3, 4, 5; Fig. 5: K = 3, 4, 5 at L = 4 beat DNC. These captions were checked against a summary of
the paper; the theorem's exact statement and number are only *recalled*, see THEORY.md §4.3).

This module implements the explicit family of THEORY.md §4.3 (derived there, re-derived below), evaluates its
loss in closed form, minimises it over its few scalars, and builds explicit parameters of the best member.
Every member is an explicit feasible point of the DUFM, so the family minimum is a rigorous **upper bound**
on the DUFM optimum; it is *not* a proof of optimality.

Structure (n samples per class, balanced, no bias; class means only, features collapsed within classes):

* B (r x K) is the vertex-edge incidence matrix of K_r; B^T B = 2I + A with A the adjacency of the line graph
  T(r), an srg(K, 2(r-2), r-2, 4). The Bose-Mesner algebra span{I, A, Abar = J - I - A} has the idempotents
  E0 = J/K (multiplicity 1), E1 = (B^T B - (2r-2)E0)/(r-2) (mult. r-1), E2 = I - E0 - E1 (mult. K-r).
  A matrix x I + y A + w Abar has eigenvalues (on E0, E1, E2)
      x + 2(r-2) y + (K-1-2(r-2)) w,    x + (r-4) y - (r-3) w,    x - 2y + w            (A: 2(r-2), r-4, -2).
* Intermediate layers l = 2..L-1: M_l = [alpha_l I_K ; beta_l B ; gamma_l 1^T] >= 0 (some blocks may be
  absent), so the ReLU of these layers is inactive. Gram eigenvalues on (E0, E1, E2):
      e_l = (alpha^2 + (2r-2) beta^2 + K gamma^2,  alpha^2 + (r-2) beta^2,  alpha^2).
* The last pre-activation is Z_L = d I + s A + t Abar (entries: diagonal, edges sharing a vertex, disjoint
  edges), eigenvalues z = (z0, z1, z2); the last features are M_L = relu(Z_L) = d_+ I + s_+ A + t_+ Abar with
  eigenvalues mu (signed; singular values |mu|).
* Costs (all matrices commute, so each is a sum over eigenspaces j with multiplicity m_j):
  - layer 1 (L >= 3): min over W_1 M_1 = M_2 of lam_W1/2 ||W_1||^2 + n lam_H/2 ||M_1||^2
    = sqrt(lam_W1 n lam_H) ||M_2||_*   (factorisation lemma (F), THEORY §0) = c1 sum_j m_j sqrt(e_{2,j});
    for L = 2 it factors Z_2 = Z_L directly: c1 sum_j m_j |z_j|;
  - middle layers 2 <= l <= L-2, minimum-norm W_l = M_{l+1} G_l^+ M_l^T with G_l = M_l^T M_l:
    lam_Wl/2 ||W_l||^2 = lam_Wl/2 tr(G_{l+1} G_l^+) = lam_Wl/2 sum_j m_j e_{l+1,j}/e_{l,j};
  - W_{L-1} = Z_L G_{L-1}^+ M_{L-1}^T: lam/2 sum_j m_j z_j^2 / e_{L-1,j};
  - last layer + fit, exactly (ridge): min_W 1/(2K)||W M_L - I||^2 + lam/2 ||W||^2
    = sum_j m_j lam / (2 (mu_j^2 + K lam)),  W = (M_L^T M_L + K lam I)^{-1} M_L^T.
  An eigenspace j absent from an intermediate layer (e_{l,j} = 0) must be absent from every later layer
  and from Z_L (z_j = 0): that is the range condition of the minimum-norm maps.
* Members: DNC (alpha only, Z_L = d I, d > 0); "pure SRG" (beta only in every intermediate layer, z2 = 0:
  rank r before the last ReLU; the construction of the paper's Fig. 1); and the mixtures.

The scalars (the block scales per intermediate layer, log-parametrised, and the three entries of Z_L with a
fixed sign pattern, so that the ReLU kink at 0 is a bound) are minimised with SLSQP from several starts, with
exact complex-step gradients. The search is numerical (a local method, multistart): the minimum found is an
upper bound on the family minimum and hence on the DUFM optimum.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

from .scalar import classwise

BLOCKS = ("alpha", "beta", "gamma")  # alpha I_K, beta B, gamma 1^T


def incidence(r: int) -> np.ndarray:
    """Vertex-edge incidence matrix B (r x K) of the complete graph K_r; edges in lexicographic order."""
    edges = list(itertools.combinations(range(r), 2))
    B = np.zeros((r, len(edges)))
    for k, (i, j) in enumerate(edges):
        B[i, k] = B[j, k] = 1.0
    return B


def _algebra(r: int):
    """(K, multiplicities, T, G) with T the eigenvalue map of x I + y A + w Abar and G the Gram-eigenvalue map
    of the squared block scales (alpha^2, beta^2, gamma^2)."""
    K = r * (r - 1) // 2
    mult = np.array([1.0, r - 1.0, K - r])
    T = np.array([[1.0, 2.0 * (r - 2), K - 1.0 - 2.0 * (r - 2)], [1.0, r - 4.0, -(r - 3.0)], [1.0, -2.0, 1.0]])
    G = np.array([[1.0, 2.0 * r - 2.0, K], [1.0, r - 2.0, 0.0], [1.0, 0.0, 0.0]])
    if r == 3:  # K = 3: no disjoint edges (Abar = 0) and no E2
        T[:, 2] = 0.0
    return K, mult, T, G


def idempotents(r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E0, E1, E2) of the line graph T(r) (see module docstring)."""
    B = incidence(r)
    K = B.shape[1]
    E0 = np.full((K, K), 1.0 / K)
    E1 = (B.T @ B - (2 * r - 2) * E0) / (r - 2) if r > 2 else np.zeros((K, K))
    return E0, E1, np.eye(K) - E0 - E1


def _alive(blocks: tuple[int, ...], L: int, mult: np.ndarray) -> np.ndarray:
    """Which eigenspaces (E0, E1, E2) carry signal through the intermediate layers."""
    if L == 2:
        return mult > 0
    return (mult > 0) & np.array([True, (0 in blocks) or (1 in blocks), 0 in blocks])


def _family_fn(r, L, lam_H, lam_W, n, blocks, sgn):
    """The family loss as a function of theta = (log block scales (L-2) x len(blocks), |entries| (3,)),
    vectorised over leading axes and complex-step friendly (no abs/max on traced parts)."""
    K, mult, T, G = _algebra(r)
    nint, nb = L - 2, len(blocks)
    c1 = np.sqrt(lam_W[0] * n * lam_H)
    lw = lam_W[L - 1]
    alive = _alive(blocks, L, mult)
    m = np.where(alive, mult, 0.0)
    pos = (np.asarray(sgn) > 0).astype(float)
    bidx = list(blocks)

    def f(x):
        u = x[..., nb * nint : nb * nint + 3]
        z = (u * sgn) @ T.T
        mu = (u * pos) @ T.T
        out = np.sum(mult * lw / (2 * (mu**2 + K * lw)), axis=-1)
        if L == 2:
            return out + c1 * np.sum(m * np.sqrt(z * z), axis=-1)
        v = np.zeros(x.shape[:-1] + (nint, 3), dtype=x.dtype)
        v[..., bidx] = np.exp(2 * x[..., : nb * nint].reshape(x.shape[:-1] + (nint, nb)))
        e = np.where(alive, v @ G.T, 1.0)
        out = out + c1 * np.sum(m * np.sqrt(e[..., 0, :]), axis=-1)
        for l in range(nint - 1):
            out = out + lam_W[l + 1] / 2 * np.sum(m * e[..., l + 1, :] / e[..., l, :], axis=-1)
        return out + lam_W[L - 2] / 2 * np.sum(m * z**2 / e[..., -1, :], axis=-1)

    return f


class SRGMember(NamedTuple):
    """One explicit member of the SRG family (THEORY.md §4.3) and its exact family loss.

    ``scales``: (L-2, 3) array of (alpha_l, beta_l, gamma_l) for the intermediate layers l = 2..L-1 (0 = block
    absent); ``entries``: (d, s, t), the diagonal / share-a-vertex / disjoint entries of Z_L.
    """

    r: int
    L: int
    loss: float
    scales: np.ndarray
    entries: np.ndarray
    blocks: tuple[int, ...]

    @property
    def K(self) -> int:
        return self.r * (self.r - 1) // 2

    @property
    def kind(self) -> str:
        """'dnc' (alpha only, Z_L = d I), 'pure-srg' (beta only, rank r before the last ReLU) or 'mixed'."""
        d, s, t = self.entries
        tol = 1e-9 * max(abs(d), abs(s), abs(t), 1e-300)
        if self.blocks in ((0,), ()) and abs(s) <= tol and abs(t) <= tol and d > 0:
            return "dnc"
        z = self._z()
        if self.blocks in ((1,), ()) and (self.r == 3 or abs(z[2]) <= 1e-9 * np.max(np.abs(z))):
            return "pure-srg"
        return "mixed"

    def _z(self):
        _, _, T, _ = _algebra(self.r)
        return T @ self.entries

    def rows(self) -> int:
        """Rows needed by each intermediate layer (block sizes K, r, 1)."""
        return sum((self.K, self.r, 1)[b] for b in self.blocks)


def member_loss(r: int, L: int, lam_H: float, lam_W, n: int, scales, entries) -> float:
    """Exact family loss of an explicit member (THEORY.md §4.3), in NumPy float64 (a direct evaluation, no
    optimisation); blocks with scale 0 are absent."""
    lam_W = np.broadcast_to(np.asarray(lam_W, float), (L,))
    scales = np.asarray(scales, float).reshape(max(L - 2, 0), 3)
    entries = np.asarray(entries, float)
    blocks = tuple(b for b in range(3) if L > 2 and np.all(scales[:, b] > 0))
    if L > 2 and any(np.any((scales[:, b] > 0) != (scales[0, b] > 0)) for b in range(3)):
        raise ValueError("member_loss: every block must be present in all intermediate layers or in none")
    sgn = np.where(entries >= 0, 1.0, -1.0)
    x = np.concatenate([np.log(scales[:, list(blocks)]).ravel(), np.abs(entries)])
    K, mult, T, _ = _algebra(r)
    alive = _alive(blocks, L, mult)
    z = T @ entries
    if np.any(~alive & (mult > 0) & (np.abs(z) > 1e-12 * max(1.0, np.max(np.abs(z))))):
        return float("inf")  # Z_L has a component the chain cannot produce
    return float(_family_fn(r, L, float(lam_H), lam_W, n, blocks, sgn)(x))


def _patterns(L, max_rows, K, r, d1):
    if L == 2:
        return [()]
    out = []
    for k in (1, 2, 3):
        for b in itertools.combinations((0, 1, 2), k):
            rows = sum((K, r, 1)[i] for i in b)
            rank2 = K if 0 in b else (r if 1 in b else 1)
            if rows <= max_rows and rank2 <= d1:
                out.append(b)
    return out


def _optimise_pattern(r, L, lam_H, lam_W, n, blocks, sgn, x0s, kill2=False):
    K, mult, T, _ = _algebra(r)
    nint, nb = L - 2, len(blocks)
    nv = nb * nint + 3
    f = _family_fn(r, L, lam_H, lam_W, n, blocks, np.asarray(sgn))
    h = 1e-30
    eye = 1j * h * np.eye(nv)

    def fg(x):
        X = np.empty((nv + 1, nv), complex)
        X[:] = x
        X[1:] += eye
        val = f(X)
        return val[0].real, val[1:].imag / h

    alive = _alive(blocks, L, mult)
    if kill2:
        alive = alive & np.array([True, True, False])
    cons = []
    for j in (1, 2):
        if mult[j] > 0 and not alive[j]:
            row = np.concatenate([np.zeros(nb * nint), np.asarray(sgn) * T[j]])
            cons.append(
                {"type": "eq", "fun": lambda x, row=row: np.array([row @ x]), "jac": lambda x, row=row: row[None]}
            )
    bounds = [(-30.0, 30.0)] * (nb * nint) + [(0.0, 1e3)] * 3
    if r == 3:
        bounds[-1] = (0.0, 0.0)
    best = (np.inf, None)
    for x0 in x0s:
        with np.errstate(all="ignore"):
            try:
                res = minimize(
                    fg,
                    x0[:nv],
                    jac=True,
                    method="SLSQP",
                    bounds=bounds,
                    constraints=cons,
                    options={"maxiter": 300, "ftol": 1e-16},
                )
            except (ValueError, np.linalg.LinAlgError):  # pragma: no cover - defensive
                continue
        x = res.x
        # exact feasibility: remove the (tiny) components of Z_L on dead eigenspaces
        ent = np.asarray(sgn) * x[nb * nint :]
        z = T @ ent
        z[~alive] = 0.0
        Tin = T if r > 3 else T[:2, :2]
        ent = np.linalg.solve(Tin, z[: Tin.shape[0]]) if r > 3 else np.concatenate([np.linalg.solve(Tin, z[:2]), [0.0]])
        scales = np.zeros((nint, 3))
        if nint:
            scales[:, list(blocks)] = np.exp(x[: nb * nint].reshape(nint, nb))
        val = member_loss(r, L, lam_H, lam_W, n, scales, ent)
        if np.isfinite(val) and val < best[0]:
            best = (val, SRGMember(r, L, val, scales, ent, tuple(blocks) if nint else ()))
    return best


@functools.lru_cache(maxsize=256)
def _search_cached(r, L, lam_H, lam_W, n, max_rows, d1, pure, seed):
    lam_W = np.asarray(lam_W)
    K, mult, T, _ = _algebra(r)
    rng = np.random.default_rng(seed)
    pats = ([(1,)] if L > 2 else [()]) if pure else _patterns(L, max_rows, K, r, d1)
    kill2 = pure and L == 2
    if pure and L > 2 and not ((r <= max_rows) and (r <= d1)):
        return None
    # sign patterns of (d, s, t); all-negative gives M_L = 0 (loss >= 1/2, never better than the zero point)
    signs = [
        np.array(s)
        for s in itertools.product((1.0, -1.0), repeat=3)
        if (r > 3 or s[2] > 0) and max(s[: 3 if r > 3 else 2]) > 0
    ]
    # stage 1: one start per (pattern, sign pattern); stage 2: more starts on the 3 best
    results = []
    for b in pats:
        nv = len(b) * (L - 2) + 3
        for sg in signs:
            x0s = [np.concatenate([rng.normal(size=nv - 3) * 0.5 - 0.3, np.abs(rng.normal(size=3)) * 0.5 + 0.05])]
            val, mem = _optimise_pattern(r, L, lam_H, lam_W, n, b, sg, x0s, kill2)
            if mem is not None:
                results.append((val, b, sg, mem))
    if not results:
        return None
    results.sort(key=lambda t: t[0])
    best = results[0][3]
    for _, b, sg, _m in results[:3]:
        nv = len(b) * (L - 2) + 3
        x0s = [
            np.concatenate([rng.normal(size=nv - 3) * 0.7 - 0.3, np.abs(rng.normal(size=3)) * 0.7 + 0.05])
            for _ in range(3)
        ]
        v2, m2 = _optimise_pattern(r, L, lam_H, lam_W, n, b, sg, x0s, kill2)
        if m2 is not None and v2 < best.loss:
            best = m2
    if pure and best.kind != "pure-srg":
        return None
    return best


def srg_search(
    r: int,
    L: int,
    lam_H: float,
    lam_W,
    n: int = 1,
    *,
    max_rows: int | None = None,
    d1: int | None = None,
    pure: bool = False,
    seed: int = 0,
) -> SRGMember | None:
    """Minimise the SRG-family loss (THEORY.md §4.3) over its scalars; returns the best member found.

    Args:
      r: K = r(r-1)/2 classes, r >= 3.
      L: number of weight matrices (L >= 2).
      lam_H, lam_W: lambda_H and lambda_W (scalar or L values); n: samples per class.
      max_rows: the smallest intermediate width min(d_2..d_{L-1}): block patterns needing more rows
        (K for alpha, r for beta, 1 for gamma) are skipped. None = no limit.
      d1: the feature width d_1 (the first layer factors M_2, of rank K with alpha, r with beta, else 1).
      pure: restrict to the pure SRG member (beta only, z2 = 0), the construction of the paper's Fig. 1/3.

    Returns:
      An `SRGMember` (its ``loss`` is the exact family loss at its scalars, an upper bound on the DUFM optimum),
      or None if no admissible member exists (widths too small).
    """
    if r < 3:
        raise ValueError(f"r must be >= 3 (K = r(r-1)/2 >= 3 classes); got r={r}")
    lam_W = tuple(float(x) for x in np.broadcast_to(np.asarray(lam_W, float), (L,)))
    big = 10**9
    return _search_cached(
        int(r),
        int(L),
        float(lam_H),
        lam_W,
        int(n),
        big if max_rows is None else int(max_rows),
        big if d1 is None else int(d1),
        bool(pure),
        int(seed),
    )


def dnc_scalar(K: int, L: int, lam_H: float, lam_W, n: int = 1) -> tuple[float, float]:
    """(s*, loss) of the DNC configuration of the balanced DUFM: the bias-free deep-linear scalar problem with
    P = L + 1 factors (THEORY.md §4.1): min_s (1-s)^2/2 + K (P/2) C s^{2/P}, C = (n lam_H prod lam_W)^{1/P}
    (`scalar.classwise` with K classes of size n)."""
    cw = classwise(np.full(K, float(n)), lam_H, np.broadcast_to(np.asarray(lam_W, float), (L,)))
    return float(cw.s[0]), cw.loss


def srg_ratio(r: int, L: int, lam: float = 0.004, n: int = 1, member: str = "pure") -> float:
    """L_SRG / L_DNC for the L-layer ReLU DUFM with K = r(r-1)/2 classes, every lambda = ``lam``.

    This is the curve of Súkeník, Lampert, Mondelli 2024, Fig. 3 (left) (figure number recalled), computed
    here in closed form, without training: L_DNC is the DNC loss (THEORY.md §4.1) and L_SRG the minimum over

    * ``member="pure"`` (default): the pure SRG member, intermediate class means beta_l B (B the incidence
      matrix of K_r) and a rank-r last pre-activation (the construction of the paper's Fig. 1); the ratio
      exceeds 1 where this member loses to DNC (small r and L);
    * ``member="family"``: the whole SRG family of THEORY.md §4.3 (contains DNC, so the ratio is <= 1).

    Values below 1 prove that DNC is not a global optimum at these parameters (the SRG point is explicit).

    Where the family beats DNC (computed here; tests/test_theory_slow.py): with lam = 0.004, n = 1, exactly for
    (r = 4, K = 6, L >= 4) and (r >= 5, K >= 10, L >= 3) in the range r = 3..8, L = 2..6 (never for K = 3 or
    L = 2), the pattern of the paper's theorem (recalled: K >= 6 and L >= 4, or K >= 10 and L >= 3). The same
    holds for lam = 0.001 and 0.01 (ratios change by < 2%). It depends on lambda near DNC's zero threshold
    C* (THEORY §0): a low-rank point survives to larger lambda than DNC, e.g. K = 10, L = 2, lam = 0.04 (DNC is
    the zero solution, loss 1/2) has family/DNC = 0.980, while at larger lambda both can be the zero solution
    (ratio 1, e.g. K = 15, L = 4, lam = 0.02). Family values (lam = 0.004, n = 1; THEORY §4.3 has the same
    numbers): r = 4: 0.944 (L=4), 0.891 (5); r = 5: 0.921 (3), 0.816 (4), 0.752 (5); r = 6: 0.921 (3),
    0.782 (4), 0.700 (5).

    Example:
      >>> import ufm
      >>> round(ufm.srg_ratio(5, 4), 3)
      0.816
    """
    if member not in ("pure", "family"):
        raise ValueError(f"member must be 'pure' or 'family'; got {member!r}")
    if not isinstance(r, (int, np.integer)) or r < 3:
        raise ValueError(f"r must be an integer >= 3 (K = r(r-1)/2 classes); got {r!r}")
    if not isinstance(L, (int, np.integer)) or L < 2:
        raise ValueError(f"L must be an integer >= 2 (number of weight matrices); got {L!r}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0; got {lam!r}")
    K = r * (r - 1) // 2
    _, dnc = dnc_scalar(K, L, lam, lam, n)
    m = srg_search(r, L, lam, lam, n, pure=(member == "pure"))
    return float(m.loss / dnc) if m is not None else float("nan")


__all__ = ["SRGMember", "dnc_scalar", "idempotents", "incidence", "member_loss", "srg_ratio", "srg_search"]
