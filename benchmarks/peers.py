"""What a theorist would otherwise run: the UFM objective in PyTorch (eager / compiled) and hand-written NumPy.

All peers minimise exactly ``ufm.objective`` (THEORY.md §0, §4) for bias-free problems:

    f = fit(W_L s(... s(W_1 H)), Y) + sum_l lam_W[l]/2 ||W_l||_F^2 + lam_H/2 ||H||_F^2,

fit = 1/(2N)||Out - Y||_F^2 (MSE) or 1/N sum_i CE(out_i, y_i), s = ReLU or identity. They start from the
same parameters as ufm (passed in as NumPy arrays), so after S steps of the same method they must land on
the same point: every benchmark checks this before timing (``check_same_trajectory``).

* ``TorchLoop``: the research-code loop of the published deep-UFM code (Dang et al. 2023): parameters are
  ``nn.Parameter`` tensors, weight decay is the optimiser's ``weight_decay`` per parameter group (the same
  gradient as the penalty above), and every step is ``zero_grad(); loss.backward(); optimizer.step()``.
  The published code also computes metrics every step; we do not, which favours the peer.
* ``TorchFunctional``: the fastest PyTorch formulation we found: a pure step ``params -> params`` built on
  ``torch.func.grad_and_value`` and compiled whole with ``torch.compile(fullgraph=True)`` (plain GD only).
* ``NumpyGD``: forward and backward written out by hand (the gradient formulas are in ``_grads``).
"""

from __future__ import annotations

import time

import numpy as np

from ._common import torch_or_none


def problem_arrays(problem):
    """Static facts of a bias-free UFM as plain Python/NumPy: (K, n_k, N, widths, relu?, loss, lam_H, lam_W)."""
    if problem.bias != "none":
        raise ValueError("the peers implement bias='none' problems only")
    lam_W = np.broadcast_to(np.asarray(problem.lam_W, dtype=float), (problem.L,))
    return dict(
        K=problem.K,
        N=problem.N,
        labels=problem.labels(),
        widths=problem.widths,
        relu=problem.activation == "relu",
        loss=problem.loss,
        lam_H=float(problem.lam_H),
        lam_W=[float(x) for x in lam_W],
    )


def params_to_numpy(params, dtype):
    return [np.array(params.H, dtype=dtype)] + [np.array(W, dtype=dtype) for W in params.Ws]


# ------------------------------------------------------------------------------------------------ NumPy


class NumpyGD:
    """Full-batch gradient descent, x <- x - lr grad f(x), with hand-written gradients (float32 or float64)."""

    def __init__(self, problem, params0, dtype, lr):
        a = problem_arrays(problem)
        if a["loss"] != "mse":
            raise ValueError("NumpyGD implements the MSE objective only")
        self.a = a
        self.dtype = np.dtype(dtype)
        self.lr = self.dtype.type(lr)
        self.P = params_to_numpy(params0, self.dtype)
        Y = np.zeros((a["K"], a["N"]), self.dtype)
        Y[a["labels"], np.arange(a["N"])] = 1
        self.Y = Y
        self.lams = [self.dtype.type(a["lam_H"])] + [self.dtype.type(x) for x in a["lam_W"]]
        self.invN = self.dtype.type(1.0 / a["N"])

    def _grads(self, P):
        """Gradient of f at P = [H, W_1, ..., W_L] (MSE, no bias).

        Forward: H_1 = H, Z_{l+1} = W_l H_l, H_{l+1} = s(Z_{l+1}) (l < L), Out = W_L H_L.
        Backward: G_out = (Out - Y)/N; dW_L = G_out H_L^T; G_{H_L} = W_L^T G_out; for l = L-1..1:
        G_Z = G_{H_{l+1}} * 1[Z_{l+1} > 0] (ReLU; identity for linear), dW_l = G_Z H_l^T, G_{H_l} = W_l^T G_Z.
        dH = G_{H_1}. Each gradient gets + lam * parameter from the penalty lam/2 ||.||_F^2.
        """
        H, Ws = P[0], P[1:]
        hs, zs = [H], []
        h = H
        for W in Ws[:-1]:
            z = W @ h
            zs.append(z)
            h = np.maximum(z, 0) if self.a["relu"] else z
            hs.append(h)
        G = (Ws[-1] @ h - self.Y) * self.invN
        gW = [None] * len(Ws)
        for l in range(len(Ws) - 1, -1, -1):
            gW[l] = G @ hs[l].T
            G = Ws[l].T @ G
            if l > 0 and self.a["relu"]:
                G *= zs[l - 1] > 0
        grads = [G] + gW
        return [g + lam * p for g, p, lam in zip(grads, P, self.lams, strict=True)]

    def run(self, steps: int) -> None:
        P, lr = self.P, self.lr
        for _ in range(steps):
            for p, g in zip(P, self._grads(P), strict=True):
                p -= lr * g

    def loss(self) -> float:
        H, Ws = self.P[0], self.P[1:]
        h = H
        for W in Ws[:-1]:
            h = np.maximum(W @ h, 0) if self.a["relu"] else W @ h
        out = Ws[-1] @ h
        fit = 0.5 * float(np.sum((out.astype(float) - self.Y) ** 2)) / self.a["N"]
        pen = sum(lam / 2 * float(np.sum(p.astype(float) ** 2)) for lam, p in zip(self.lams, self.P, strict=True))
        return fit + pen

    def params(self):
        return [p.copy() for p in self.P]


# ------------------------------------------------------------------------------------------------ torch


def _torch_fit(torch, a, Y, labels):
    relu = a["relu"]
    N = a["N"]

    def fit(H, Ws):
        h = H
        for W in Ws[:-1]:
            h = torch.relu(W @ h) if relu else W @ h
        out = Ws[-1] @ h
        if a["loss"] == "mse":
            return ((out - Y) ** 2).sum() / (2 * N)
        return torch.nn.functional.cross_entropy(out.T, labels, reduction="sum") / N

    return fit


class TorchLoop:
    """The published research-code loop: ``zero_grad(); loss.backward(); optimizer.step()``.

    ``momentum=0`` is plain GD; ``momentum=0.9`` with ``lr=0.1`` is the Dang et al. 2023 recipe.
    ``threads`` sets ``torch.set_num_threads`` around each call (None: PyTorch's default).
    ``compiled=True`` wraps the loss in ``torch.compile`` (the backward is then compiled by AOTAutograd).
    ``penalty_in_loss=True`` puts sum lam/2 ||p||^2 into the loss instead of the optimiser's weight decay
    (the same gradient), so that ``loss.item()`` is the objective f, logged every step as research code does.
    """

    def __init__(self, problem, params0, dtype, lr, momentum=0.0, threads=None, compiled=False, penalty_in_loss=False):
        torch, why = torch_or_none()
        if torch is None:
            raise RuntimeError(why)
        self.torch = torch
        a = problem_arrays(problem)
        self.a = a
        tdt = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
        P = params_to_numpy(params0, dtype)
        self.H = torch.nn.Parameter(torch.from_numpy(P[0].copy()))
        self.Ws = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in P[1:]]
        self.labels = torch.from_numpy(a["labels"].astype(np.int64))
        self.Y = torch.nn.functional.one_hot(self.labels, a["K"]).T.to(tdt).contiguous()
        wd = 0.0 if penalty_in_loss else 1.0
        groups = [{"params": [self.H], "weight_decay": wd * a["lam_H"]}]
        groups += [{"params": [W], "weight_decay": wd * lw} for W, lw in zip(self.Ws, a["lam_W"], strict=True)]
        self.opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        fit = _torch_fit(torch, a, self.Y, self.labels)
        self.penalty_in_loss = penalty_in_loss
        if penalty_in_loss:
            fit0, lams = fit, [a["lam_H"]] + a["lam_W"]

            def fit(H, Ws):
                return fit0(H, Ws) + sum(lam / 2 * (p * p).sum() for lam, p in zip(lams, [H, *Ws]))  # noqa: B905

        self.fit = torch.compile(fit) if compiled else fit
        self.threads = threads
        self.trace: list[float] = []
        self.clock: list[float] = []

    def _threads(self):
        torch = self.torch
        old = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return old

    def penalty(self) -> float:
        """sum lam/2 ||p||^2 of the current parameters (float64 arithmetic; outside the graph)."""
        with self.torch.no_grad():
            r = self.a["lam_H"] / 2 * float((self.H.double() ** 2).sum())
            for W, lw in zip(self.Ws, self.a["lam_W"], strict=True):
                r += lw / 2 * float((W.double() ** 2).sum())
        return r

    def run(self, steps: int, record: bool = False, on_step=None) -> None:
        """``steps`` optimiser steps. With ``record``, append the objective f at each iterate *before* its
        step to ``self.trace`` and the wall clock after its step to ``self.clock``; ``on_step(i, f)`` is
        called before the step (it may snapshot the parameters)."""
        old = self._threads()
        try:
            opt, fit, H, Ws = self.opt, self.fit, self.H, self.Ws
            for i in range(steps):
                opt.zero_grad()
                loss = fit(H, Ws)
                loss.backward()
                if record:
                    f = loss.item() if self.penalty_in_loss else loss.item() + self.penalty()
                    self.trace.append(f)
                    if on_step is not None:
                        on_step(i, f)
                opt.step()
                if record:
                    self.clock.append(time.perf_counter())
        finally:
            self.torch.set_num_threads(old)

    def loss(self) -> float:
        with self.torch.no_grad():
            return float(self.fit(self.H, self.Ws)) + (0.0 if self.penalty_in_loss else self.penalty())

    def params(self):
        return [self.H.detach().numpy().copy()] + [W.detach().numpy().copy() for W in self.Ws]


class TorchFunctional:
    """Plain GD as one compiled pure function ``params -> (params - lr grad f(params))`` (torch.func)."""

    def __init__(self, problem, params0, dtype, lr, threads=None, compiled=True, share_step_with=None):
        torch, why = torch_or_none()
        if torch is None:
            raise RuntimeError(why)
        self.torch = torch
        # every instance's step is a new closure of one code object: allow one compile per shape/dtype
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        a = problem_arrays(problem)
        self.a = a
        tdt = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
        self.P = [torch.from_numpy(p.copy()) for p in params_to_numpy(params0, dtype)]
        labels = torch.from_numpy(a["labels"].astype(np.int64))
        Y = torch.nn.functional.one_hot(labels, a["K"]).T.to(tdt).contiguous()
        fit = _torch_fit(torch, a, Y, labels)
        lams = [a["lam_H"]] + a["lam_W"]

        def objective(P):
            return fit(P[0], P[1:]) + sum(lam / 2 * (p * p).sum() for lam, p in zip(lams, P))  # noqa: B905 (dynamo)

        gv = torch.func.grad_and_value(objective)

        def step(P):
            g, v = gv(P)
            return [p - lr * gi for p, gi in zip(P, g)], v  # noqa: B905 (traced by dynamo)

        if share_step_with is not None:  # same problem and dtype: reuse its compiled step (no second compile)
            self.step = share_step_with.step
        else:
            self.step = torch.compile(step, fullgraph=True) if compiled else step
        self.threads = threads

    def run(self, steps: int) -> None:
        torch = self.torch
        old = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            P, step = self.P, self.step
            with torch.no_grad():
                for _ in range(steps):
                    P, _ = step(P)
            self.P = P
        finally:
            torch.set_num_threads(old)

    def params(self):
        return [p.numpy().copy() for p in self.P]


# ------------------------------------------------------------------------------------------------ checks


def f64_objective(problem, P) -> float:
    """The objective at NumPy parameters [H, W_1..W_L], evaluated by ufm in float64 (an independent path
    from the peers' own loss code)."""
    import jax.numpy as jnp

    import ufm

    params = ufm.Params(jnp.asarray(P[0], jnp.float64), tuple(jnp.asarray(w, jnp.float64) for w in P[1:]), None)
    return float(ufm.objective(problem, params))


def max_rel_diff(P, Q) -> float:
    """max over parameters of ||P_i - Q_i||_F / ||Q_i||_F."""
    return max(
        float(np.linalg.norm(np.asarray(p, float) - np.asarray(q, float)) / max(np.linalg.norm(q), 1e-300))
        for p, q in zip(P, Q, strict=True)
    )
