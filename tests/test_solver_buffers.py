"""The allocation-free paths of ``adaptive_ode`` and ``unipc`` against plain out-of-place arithmetic.

- ``adaptive_ode`` on a :class:`~sdediff.LinearSDE` evaluates the probability flow as ``a(t) x - (g^2/2) s`` into
  reused buffers; an SDE that overrides ``drift`` takes the generic :func:`~sdediff.solvers.ode.pf_drift` path.
  Both make the same operations in the same order, so float64 results, step counts and rejections agree
  exactly, also while only part of the batch is still stepping (samples bound for a narrow mode finish late).
- ``unipc`` recycles the buffers of its prediction history; a direct out-of-place implementation of the formulas
  of :func:`~sdediff.solvers.unipc.unipc_coefficients` gives the same samples (float64, 1e-12 relative), and so
  do runs that keep the trajectory or take a callback (which lend the step other output buffers).
"""

import pytest
import torch
from problems import EPS, MIXTURE, NARROW, T64, gen

import sdediff
from sdediff.solvers.grids import make_grid
from sdediff.solvers.tables import kernel
from sdediff.solvers.unipc import unipc_coefficients


class DriftOverriddenVP(sdediff.VPSDE):
    """The VP SDE with ``drift`` overridden by the same formula: ``adaptive_ode`` cannot assume ``f = a(t) x``."""

    def drift(self, x, t):
        return super().drift(x, t)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adaptive_ode_linear_path_equals_generic_path(method, dtype):
    plain, generic = sdediff.VPSDE(), DriftOverriddenVP()
    x_T = NARROW.marginal(plain, plain.T).sample(64, generator=gen(3), dtype=T64).to(dtype)
    out = []
    for sde in (plain, generic):
        info = sdediff.sample(sde, NARROW.score_fn(sde), x_T.shape, solver="adaptive_ode", eps=EPS, x_init=x_T,
                              rtol=1e-4, atol=1e-4, method=method, return_info=True)
        out.append(info)
    steps = out[0].stats["steps_per_sample"]
    assert steps.max() > steps.min()  # samples finish at different iterations: the partial-batch path ran
    assert torch.equal(out[0].samples, out[1].samples)
    for key in ("nfe_per_sample", "steps_per_sample", "rejected_per_sample"):
        assert torch.equal(out[0].stats[key], out[1].stats[key]), key
    assert out[0].stats["rejected_per_sample"].sum() > 0  # rejections (the k_1 kept, the state left) happened


def unipc_reference(sde, score_fn, x, ts, order, prediction, variant, corrector):
    """UniPC written out of place from its coefficients (module docstring of sdediff.solvers.unipc)."""
    m, s, lam = kernel(sde, ts.to(T64))
    a, w, v = unipc_coefficients(lam, m, s, order, prediction, variant)
    n, steps = x.shape[0], len(ts) - 1

    def predict(y, i):
        score = score_fn(y, ts[i].expand(n))
        return (y + s[i] ** 2 * score) / m[i] if prediction == "data" else -s[i] * score

    hist, new = [], None
    for i in range(steps):
        hist = [predict(x, i) if new is None else new, *hist][:order]
        x_pred = a[i] * x + sum(w[i, j] * p for j, p in enumerate(hist))
        if not corrector or i == steps - 1:
            x, new = x_pred, None
            continue
        new = predict(x_pred, i + 1)
        x = a[i] * x + sum(v[i, j] * p for j, p in enumerate(hist)) + v[i, order] * new
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("prediction,variant,corrector", [("data", "bh2", True), ("noise", "bh1", True),
                                                          ("data", "bh2", False)])
def test_unipc_buffers_match_out_of_place_formulas(order, prediction, variant, corrector):
    sde = sdediff.VESDE()
    score_fn = MIXTURE.score_fn(sde)
    x_T = MIXTURE.marginal(sde, sde.T).sample(32, generator=gen(5), dtype=T64)
    steps = 12
    ts = make_grid(sde, steps, EPS, "karras", dtype=T64)
    ref = unipc_reference(sde, score_fn, x_T, ts, order, prediction, variant, corrector)
    options = dict(order=order, prediction=prediction, variant=variant, corrector=corrector)
    kwargs = dict(solver="unipc", steps=steps, eps=EPS, x_init=x_T, time_grid="karras", **options)
    seen = []
    runs = [sdediff.sample(sde, score_fn, x_T.shape, **kwargs),
            sdediff.sample(sde, score_fn, x_T.shape, keep_trajectory=True, **kwargs).samples,
            sdediff.sample(sde, score_fn, x_T.shape, callback=lambda i, t, x: seen.append(x.clone()), **kwargs)]
    assert len(seen) == steps and torch.equal(seen[-1], runs[2])
    for x in runs:
        assert ((x - ref).abs().max() / ref.abs().max()) < 1e-12
