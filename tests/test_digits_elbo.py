"""Smoke-with-truth test of benchmarks/digits_elbo.py at a tiny size (2 training steps, 4 test images)."""

import json
import math

import torch
from problems import load_benchmark

import sdediff


def test_digits_elbo_quick_run_writes_consistent_results(tmp_path):
    bench = load_benchmark("digits_elbo")
    assert bench.main(["--quick", "--steps", "2", "--n-test", "4", "--tol", "1e-3", "--bound-t", "4",
                       "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "digits_elbo_quick.json").read_text())
    md = (tmp_path / "digits_elbo_quick.md").read_text()
    assert "fixed VP" in md and "learned schedule" in md
    offset = math.log2(17) - 1
    for kind, row in doc["models"].items():
        terms = row["bound_terms_bpd"]
        # the bound is the sum of its terms plus the dequantisation offset
        assert abs(row["bound_bpd"] - (sum(terms.values()) + offset)) < 1e-6, kind
        assert all(math.isfinite(row[k]) for k in ("ode_bpd", "bound_bpd", "discrete_bound_bpd")), kind
        assert row["steps"] == 2
    # the fixed VP row reports VP's own -log SNR at t_eps and T
    vp = sdediff.VPSDE()
    expected = (-vp.log_snr(torch.tensor([1e-5, 1.0], dtype=torch.float64))).tolist()
    assert all(abs(a - b) < 1e-6 for a, b in zip(doc["models"]["vp"]["gamma_ends"], expected, strict=True))
    assert doc["models"]["learned"]["gamma_ends"][1] < expected[1]  # LearnedScheduleSDE starts at gamma(T) = 5
