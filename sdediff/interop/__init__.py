"""Interoperability with other diffusion libraries (neither is imported by sdediff itself).

- :mod:`sdediff.interop.diffusers`: a diffusers noise-prediction model and its scheduler's ``alphas_cumprod``
  as an sdediff SDE and score (:func:`~sdediff.interop.diffusers.from_diffusers`).
- :mod:`sdediff.interop.kdiffusion`: an sdediff ``(sde, score_fn)`` as a k-diffusion denoiser
  :math:`D(x, \\sigma)`, and a k-diffusion denoiser as an sdediff ``(sde, score_fn)``.
"""

from . import diffusers, kdiffusion

__all__ = ["diffusers", "kdiffusion"]
