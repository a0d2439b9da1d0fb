r"""Exact likelihoods through the probability-flow ODE, with error bars, and bits/dim for quantised data.

The probability flow :math:`dx/dt = v(x,t)` is a continuous normalising flow; along its paths the
instantaneous change of variables gives

.. math::  \log p_\epsilon(x_\epsilon) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot v(x_t, t)\,dt.

:func:`log_likelihood` integrates the augmented flow point by point with a variable-step Adams method that controls
the error of the log-density itself (:mod:`sdediff.likelihood.adams`), in the model's noise level for linear SDEs
(:mod:`sdediff.likelihood.flows`), with the divergence computed exactly or estimated by Hutchinson's trick
(:mod:`sdediff.likelihood.divergence`). Each result carries an integration-error estimate and, with several
probes, a standard error; :func:`bits_per_dim` turns either into bits/dim. :func:`sharded_log_likelihood` shares
the points out among the processes of a ``torchrun`` job.

Modules: :mod:`~sdediff.likelihood.engine` (the entry point and its result), :mod:`~sdediff.likelihood.adams`,
:mod:`~sdediff.likelihood.flows`, :mod:`~sdediff.likelihood.quadrature`, :mod:`~sdediff.likelihood.divergence`,
:mod:`~sdediff.likelihood.bits`, :mod:`~sdediff.likelihood.sharded`.
"""

from .bits import BitsPerDim, bits_per_dim, dequantize
from .divergence import divergence_exact, divergence_hutchinson
from .engine import DEFAULT_HUTCHINSON_TOL_PER_DIM, DEFAULT_TOL, METHODS, LikelihoodResult, auto_trace, log_likelihood
from .flows import NotDifferentiableError
from .sharded import sharded_log_likelihood

__all__ = ["log_likelihood", "LikelihoodResult", "bits_per_dim", "BitsPerDim", "dequantize", "divergence_exact",
           "divergence_hutchinson", "NotDifferentiableError", "METHODS", "DEFAULT_TOL", "DEFAULT_HUTCHINSON_TOL_PER_DIM",
           "sharded_log_likelihood", "auto_trace"]
