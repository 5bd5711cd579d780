"""The deep ReLU UFM (L >= 2, MSE, no bias): the DNC point (THEORY.md §4.1, §9.5) and the strongly-regular-graph
configuration (THEORY §4.3, `srg`); `dufm` chooses and describes the lower one."""

from __future__ import annotations

import math

import numpy as np

from .._problem import UFM
from .prediction import REF_SLM24, REF_SMI23, Prediction, pad, sv_len, unknown
from .scalar import classwise, phi_threshold
from .srg import SRGMember, idempotents, incidence, srg_search


def _dnc_prediction(problem: UFM, lam_H, lam_W, *, known: bool, reason: str, reference: str) -> Prediction:
    K, L = problem.K, problem.L
    ns = np.asarray(problem.class_sizes, float)
    loss, s, a, regs = classwise(problem.class_sizes, lam_H, lam_W)
    lw, lh = sv_len(problem)
    # sigma(H_l) (l >= 2) = prod_{i<l} a_i (per class), sigma(W_l) (l >= 2) = a_l; W_1 and H_1 are not unique
    # (THEORY §4.1 non-uniqueness), but ||W_1||_F^2 = sum a_1^2 and ||H_1||_F^2 = sum a_0^2 are.
    prods = [np.prod(a[: l + 1], axis=0) for l in range(L)]
    sv_W = (np.full(lw[0], np.nan),) + tuple(pad(a[l + 1], lw[l]) for l in range(1, L))
    sv_H = (np.full(lh[0], np.nan),) + tuple(pad(prods[l], lh[l]) for l in range(1, L))
    m = [prods[l] / np.sqrt(ns) for l in range(L)]  # class-mean norms of H_{l+1}
    gram_H = (None,) + tuple(np.diag(m[l] ** 2) for l in range(1, L))
    zero = not np.any(s > 0)
    regime = "zero" if zero else ("threshold" if "threshold" in regs else "collapse")
    if zero:
        structure = "all-zero features and weights (loss 1/2)"
    elif problem.balanced:
        structure = (
            "DNC in every layer: within-class collapse everywhere; class means of H_2..H_L form a "
            "non-negative orthogonal frame (ReLUs inactive), W_l (l >= 2) has K equal singular values; "
            "W_1, H_1 not unique (only their norms and ||W_1 H_1||_*)"
        )
    else:
        zeroed = [k for k in range(K) if s[k] == 0]
        structure = (
            "DNC-type point: non-negative orthogonal class means with class-dependent norms in layers >= 2 "
            "(the deep-linear optimum of THEORY §9.1 rotated into the non-negative orthant)"
        )
        if zeroed:
            structure += f"; minority collapse: classes {zeroed} zeroed"
    P = L + 1
    C = (ns[0] * lam_H * np.prod(lam_W)) ** (1.0 / P) if problem.balanced else math.nan
    return Prediction(
        known=known,
        loss=loss,
        regime=regime,
        structure=structure,
        reference=reference,
        reason=reason,
        sv_W=sv_W,
        sv_H=sv_H,
        sv_out=pad(np.sqrt(ns) * s, K),
        norms_W=np.array([np.sqrt(np.sum(a[l + 1] ** 2)) for l in range(L)]),
        norms_H=np.array([np.sqrt(np.sum(prods[l] ** 2)) for l in range(L)]),
        b=None,
        gram_H=gram_H if not zero else (None,) * L,
        gram_W=np.diag(a[L] ** 2),
        target_gram=(None,)
        + (("zero" if zero else "orthogonal" if problem.balanced else "orthogonal-unequal"),) * (L - 1),
        configuration="dnc",
        dnc_loss=loss,
        control="C = (n lam_H prod lam_W)^{1/(L+1)} (zero regime iff C >= C*)",
        control_value=C,
        control_threshold=phi_threshold(P) / (K * P / 2.0),
    )


def _triangular_r(K: int) -> int | None:
    r = int(round((1 + math.sqrt(1 + 8 * K)) / 2))
    return r if r >= 3 and r * (r - 1) // 2 == K else None


def srg_members(problem: UFM, lam_H, lam_W):
    """(srg member, family-best member) admissible for the problem's widths, or (None, None)."""
    K, L = problem.K, problem.L
    r = _triangular_r(K)
    w = problem.widths
    if r is None or not problem.balanced or w[-1] < K or (L == 2 and w[0] < K):
        return None, None
    max_rows = min(w[1 : L - 1]) if L > 2 else None
    n = problem.class_sizes[0]
    fam = srg_search(r, L, lam_H, lam_W, n, max_rows=max_rows, d1=w[0])
    pure = srg_search(r, L, lam_H, lam_W, n, max_rows=max_rows, d1=w[0], pure=True)
    cands = [m for m in (pure, fam) if m is not None and m.kind != "dnc"]
    srg = min(cands, key=lambda m: m.loss) if cands else None
    return srg, fam


def srg_params(problem: UFM, mem: SRGMember, lam_H, lam_W):
    """Explicit parameters (NumPy) of an SRG-family member (see ufm/_theory/srg.py for the derivation of each map)."""
    K, L, r = problem.K, problem.L, mem.r
    n = problem.class_sizes[0]
    w = problem.widths + (K,)
    Bi = incidence(r)
    A = Bi.T @ Bi - 2 * np.eye(K)
    Abar = np.ones((K, K)) - np.eye(K) - A
    d, s, t = mem.entries
    ZL = d * np.eye(K) + s * A + t * Abar
    E = idempotents(r)

    def embed(M, rows):
        out = np.zeros((rows, M.shape[1]))
        out[: M.shape[0]] = M
        return out

    Ms = []  # M_2..M_{L-1}
    for l in range(L - 2):
        al, be, ga = mem.scales[l]
        blocks = [al * np.eye(K), be * Bi, ga * np.ones((1, K))]
        M = np.concatenate([blk for b, blk in enumerate(blocks) if b in mem.blocks], axis=0)
        Ms.append(embed(M, w[l + 1]))
    ZLe = embed(ZL, w[L - 1])
    ML = np.maximum(ZLe, 0.0)
    first_target = Ms[0] if L > 2 else ZLe  # Z_2 (d_2 x K); first layer factors it with cost sqrt(lam n lam_H)||.||_*
    W1, M1 = _factor_first(first_target, n, lam_H, lam_W[0], w[0])
    Ws = [W1]

    def gram_pinv(M):
        # G = M^T M = sum_j e_j E_j (Bose-Mesner algebra), so G^+ = sum over present eigenspaces of E_j / e_j
        G = M.T @ M
        mult = [np.trace(Ej) for Ej in E]
        ev = [np.sum(G * Ej) / mj if mj > 0.5 else 0.0 for Ej, mj in zip(E, mult, strict=True)]
        top = max(ev)
        return sum(Ej / e for Ej, e, mj in zip(E, ev, mult, strict=True) if mj > 0.5 and e > 1e-12 * top)

    for l in range(L - 3):  # middle W_l, l = 2..L-2: M_{l+1} G_l^+ M_l^T
        Ws.append(Ms[l + 1] @ gram_pinv(Ms[l]) @ Ms[l].T)
    if L > 2:
        Ws.append(ZLe @ gram_pinv(Ms[-1]) @ Ms[-1].T)  # W_{L-1}
    lw = lam_W[L - 1]
    WL = np.linalg.solve(ML.T @ ML + K * lw * np.eye(K), ML.T)  # ridge: (M^T M + K lam I)^{-1} M^T
    Ws.append(WL)
    return np.repeat(M1, n, axis=1), Ws


def _factor_first(Z2m: np.ndarray, ns, lam_H, lam_W1, d1):
    """Balanced factorisation of the first layer: W_1 M_1 = Z2m (class means; class sizes ns) at the minimal cost
    lam_W1/2 ||W_1||^2 + lam_H/2 ||M_1 D^{1/2}||^2 = sqrt(lam_W1 lam_H) ||Z2m D^{1/2}||_* (THEORY §0 (F), §9.0):
    with Z2m D^{1/2} = U S V^T and q = (lam_H/lam_W1)^{1/4}: W_1 = U S^{1/2} q Q^T, M_1 = Q S^{1/2} V^T D^{-1/2} / q.
    Balanced: sqrt(lam_W1 n lam_H) ||Z2m||_*."""
    ns = np.broadcast_to(np.asarray(ns, float), (Z2m.shape[1],))
    U, S, Vt = np.linalg.svd(Z2m * np.sqrt(ns)[None, :], full_matrices=False)
    r = int(np.sum(S > 1e-14 * max(S.max(), 1e-300))) if S.size else 0
    if r > d1:
        raise ValueError(f"construct: the first layer needs d_1 >= rank(Z_2) = {r}; got d_1 = {d1}")
    q = (lam_H / lam_W1) ** 0.25
    W1 = np.zeros((Z2m.shape[0], d1))
    W1[:, :r] = U[:, :r] * np.sqrt(S[:r]) * q
    M1 = np.zeros((d1, Z2m.shape[1]))
    M1[:r] = ((np.sqrt(S[:r]) / q)[:, None] * Vt[:r]) / np.sqrt(ns)[None, :]
    return W1, M1


def _srg_prediction(
    problem: UFM, mem: SRGMember, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, *, chosen: bool, reason: str
) -> Prediction:
    H, Ws = srg_params(problem, mem, lam_H, lam_W)
    L, K = problem.L, problem.K
    lw, lh = sv_len(problem)
    Hs = [H]
    for W in Ws[:-1]:
        Hs.append(np.maximum(W @ Hs[-1], 0.0))
    out = Ws[-1] @ Hs[-1]
    n = problem.class_sizes[0]
    sv = lambda M, k: pad(np.linalg.svd(M, compute_uv=False), k)  # noqa: E731
    grams = tuple((Hl[:, ::n].T @ Hl[:, ::n]) for Hl in Hs)
    rank_pre = int(np.linalg.matrix_rank(Ws[-2] @ Hs[-2][:, ::n], tol=1e-9)) if L > 1 else K
    structure = (
        f"SRG configuration ({mem.kind}, r = {mem.r}, K = {K}): intermediate class means "
        f"{'/'.join(('alpha I', 'beta B', 'gamma 1^T')[b] for b in mem.blocks) or '-'} (B = incidence matrix of "
        f"K_{mem.r}); last pre-activation Z_L = d I + s A + t Abar with (d, s, t) = "
        f"({mem.entries[0]:.6g}, {mem.entries[1]:.6g}, {mem.entries[2]:.6g}), rank {rank_pre} before the last "
        "ReLU; within-class collapse in every layer"
    )
    return Prediction(
        known=False,
        loss=float(mem.loss),
        regime="low-rank" if chosen else "unknown",
        structure=structure,
        reference=REF_SLM24,
        reason=reason,
        sv_W=tuple(sv(W, lw[i]) for i, W in enumerate(Ws)),
        sv_H=tuple(sv(Hl, lh[i]) for i, Hl in enumerate(Hs)),
        sv_out=sv(out, K),
        norms_W=np.array([np.linalg.norm(W) for W in Ws]),
        norms_H=np.array([np.linalg.norm(Hl) for Hl in Hs]),
        b=None,
        gram_H=(None,) + grams[1:],
        gram_W=Ws[-1] @ Ws[-1].T,
        target_gram=(None,) * L,
        configuration="srg",
        dnc_loss=dnc_loss,
        srg_loss=srg_loss,
        srg_family_loss=fam_loss,
    )


def _dnc_claim(problem: UFM, r, lowrank, srg_loss, fam_loss, dnc_loss) -> tuple[bool, str]:
    """Whether the DNC point is a proven optimum (K = 2 balanced, Súkeník et al. 2023) and why (not)."""
    K, L, w = problem.K, problem.L, problem.widths
    fam = None if math.isnan(fam_loss) else fam_loss
    if K == 2 and problem.balanced:
        known = True
        why = (
            ""
            if w[0] >= K
            else "d_1 = 1 < K: the theorem assumes widths >= K; the DNC point (first layer Z_2 = m_2 K/(K-1)(I - J/K), "
            "THEORY §4.1) is feasible here and optimal in any wider network, hence optimal here"
        )
    elif K == 2:
        known = False
        why = (
            "K = 2 with unequal class sizes: the DNC-type point is optimal on numerical evidence only (THEORY §9.5: "
            "no random start in ~50 settings went below it); loss is its value (an upper bound)"
        )
    else:
        known = False
        parts = ["K >= 3: DNC optimality is not proven (THEORY §4.2-4.3); the loss is the DNC value, an upper bound"]
        if not problem.balanced:
            parts.append("imbalanced classes: DNC-type point with class-dependent norms (THEORY §9.5)")
        elif r is None:
            parts.append(f"K = {K} is not r(r-1)/2, so no SRG candidate was evaluated")
        elif lowrank:
            parts.append(
                f"DNC is NOT optimal here: the explicit SRG point has a lower loss (SRG / DNC = "
                f"{srg_loss / dnc_loss:.6g}; predict(problem) describes it)"
            )
        elif fam is not None:
            parts.append(
                f"the SRG family does not beat DNC here (best family member / DNC = {fam_loss / dnc_loss:.6g})"
            )
        if L >= 3 and not lowrank:
            parts.append(
                "random L-BFGS starts reach losses below DNC at K = 3..6, L = 4, lambda = 0.004 (THEORY §4.3, "
                "asymmetric low-rank points), so DNC may well not be optimal"
            )
        why = "; ".join(parts)
    return known, why


def dufm(problem: UFM, lam_H, lam_W, configuration) -> Prediction:
    """The deep ReLU UFM (THEORY §4, §9.5): the DNC point, or the SRG configuration where it is lower."""
    K = problem.K
    ref = REF_SMI23 if K == 2 else REF_SLM24
    if problem.loss != "mse" or problem.bias != "none":
        return unknown(
            problem,
            f"deep ReLU UFM with loss={problem.loss!r}, bias={problem.bias!r}: THEORY.md treats only "
            "MSE without bias (§4); no candidate",
            ref,
            configuration=configuration,
        )
    w = problem.widths
    d1_min = K - 1 if problem.balanced else K
    dnc_ok = all(d >= K for d in w[1:]) and w[0] >= d1_min
    dnc_reason = "" if dnc_ok else (f"the DNC point needs d_1 >= {d1_min} and d_2..d_L >= K = {K}; got widths {w}")
    if K >= 3 and problem.balanced:  # the SRG family exists only for K = r(r-1)/2 (None otherwise); cached
        srg, fam = srg_members(problem, lam_H, lam_W)
    else:
        srg, fam = None, None
    dnc_loss = classwise(problem.class_sizes, lam_H, lam_W)[0] if dnc_ok else math.nan
    fam_loss = fam.loss if fam is not None else math.nan
    srg_loss = srg.loss if srg is not None else math.nan
    lowrank = srg is not None and (not dnc_ok or srg.loss < dnc_loss * (1 - 1e-9))
    r = _triangular_r(K)
    if configuration == "srg":
        if srg is None:
            why = (
                f"K = {K} is not r(r-1)/2 for an integer r >= 3"
                if r is None
                else "imbalanced classes"
                if not problem.balanced
                else f"widths {w} too small for an SRG member (needs d_L >= K and intermediate widths >= r = {r})"
            )
            return unknown(problem, f"no SRG configuration: {why}", REF_SLM24, configuration="srg", dnc_loss=dnc_loss)
        why = "explicit point of the SRG family (an upper bound on the optimum, not a proven optimum); " + (
            f"its loss is below the DNC loss (ratio {srg.loss / dnc_loss:.6g}), so DNC is NOT optimal"
            if lowrank and dnc_ok
            else f"its loss is not below the DNC loss (ratio {srg.loss / dnc_loss:.6g})"
            if dnc_ok
            else dnc_reason
        )
        return _srg_prediction(problem, srg, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, chosen=lowrank, reason=why)
    if configuration is None and lowrank:
        why = (
            f"DNC is NOT optimal here: the explicit SRG point has loss {srg.loss:.10g} < DNC loss {dnc_loss:.10g} "
            f"(ratio {srg.loss / dnc_loss:.6g}); the true optimum is unknown (this is an upper bound)"
            if dnc_ok
            else f"{dnc_reason}; best explicit point is the SRG configuration (an upper bound)"
        )
        return _srg_prediction(problem, srg, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, chosen=True, reason=why)
    if not dnc_ok:
        return unknown(problem, dnc_reason + "; no explicit candidate", ref, configuration="dnc")
    known, why = _dnc_claim(problem, r, lowrank, srg_loss, fam_loss, dnc_loss)
    p = _dnc_prediction(problem, lam_H, lam_W, known=known, reason=why, reference=ref)
    return p._replace(srg_loss=srg_loss, srg_family_loss=fam_loss)


def dnc_params(problem: UFM, lam_H, lam_W):
    """The DNC point (THEORY §4.1, §9.5): layers >= 2 have class means diag(m_l) (a non-negative orthogonal frame,
    so the ReLUs are inactive) and W_l = diag(a_l) embedded; the first layer factors the class means of Z_2:
    diag(m_2) (d_1 >= K) or, for d_1 = K-1 (balanced), m_2 K/(K-1) (I - J/K), whose ReLU is again m_2 I and
    whose nuclear norm is the same K m_2 (THEORY §4.1 non-uniqueness, t = 1/(K-1))."""
    K, L = problem.K, problem.L
    ns = np.asarray(problem.class_sizes, float)
    w = problem.widths + (K,)
    _, s, a, _ = classwise(problem.class_sizes, lam_H, lam_W)
    m2 = a[0] * a[1] / np.sqrt(ns)  # class-mean norms of H_2
    Z2 = np.diag(m2) if w[0] >= K else m2[0] * K / (K - 1.0) * (np.eye(K) - 1.0 / K)
    Z2e = np.zeros((w[1], K))
    Z2e[:K] = Z2
    W1, M1 = _factor_first(Z2e, ns, lam_H, lam_W[0], w[0])
    Ws = [W1]
    for l in range(1, L):
        W = np.zeros((w[l + 1], w[l]))
        W[np.arange(K), np.arange(K)] = a[l + 1]
        Ws.append(W)
    return M1[:, problem.labels()], Ws
