"""Closed-form flow matching for Gaussian data (a test helper, not a test module).

Data ``x0 ~ N(mu, diag(s^2))`` (``s = 0``: the single point ``mu``), noise ``n ~ N(0, I)``, and the linear
interpolant ``x_sigma = a x0 + b n`` with ``a = 1 - sigma``, ``b = sigma`` (shortcutfm's convention). Then
``x_sigma ~ N(a mu, a^2 s^2 + b^2)`` per coordinate and, with ``r^2 = a^2 s^2 + b^2``:

* ``E[x0 | x] = mu + a s^2 (x - a mu) / r^2`` and ``E[n | x] = b (x - a mu) / r^2``;
* the exact marginal velocity is ``v(x, sigma) = E[n | x] - E[x0 | x]``;
* its ODE flow map transports quantiles: ``Phi_{sigma -> sigma'}(x) = a' mu + r' (x - a mu) / r``;
* the exact average velocity over a jump ``[sigma_a -> sigma_c]`` is ``(x - Phi(x)) / (sigma_a - sigma_c)``.

Every function works on (B, D) tensors with (B,) or scalar sigmas; use float64 for tight comparisons.
"""

from __future__ import annotations

import torch


def _column(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0], *([1] * (x.ndim - 1)))


class GaussianFlow:
    """Exact velocity field and flow map of the linear interpolant for ``N(mu, diag(std^2))`` data.

    Args:
        mu: (D,) data mean.
        std: (D,) data standard deviation (zeros: a single data point, straight paths).
    """

    def __init__(self, mu: torch.Tensor, std: torch.Tensor):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def _params(self, sigma, x):
        s = _column(sigma, x)
        a, b = 1 - s, s
        mu, var = self.mu.to(x.dtype), self.std.to(x.dtype) ** 2
        return a, b, mu, var, a**2 * var + b**2

    def sample_data(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(batch, self.mu.numel(), generator=generator, dtype=torch.float64)
        return self.mu + self.std * z

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """The exact marginal velocity ``E[noise | x] - E[x0 | x]`` (the velocity contract; ``cond`` ignored)."""
        a, b, mu, var, r2 = self._params(sigma, x)
        centred = x - a * mu
        return b * centred / r2 - (mu + a * var * centred / r2)

    def flow(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """The exact ODE flow map from ``sigma_from`` to ``sigma_to`` (quantile transport)."""
        a, _, mu, _, r2 = self._params(sigma_from, x)
        a_to, _, _, _, r2_to = self._params(sigma_to, x)
        return a_to * mu + torch.sqrt(r2_to / r2) * (x - a * mu)

    def average_velocity(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """The exact average velocity over the jump: ``(x - Phi(x)) / (sigma_from - sigma_to)``."""
        span = _column(sigma_from, x) - _column(sigma_to, x)
        return (x - self.flow(x, sigma_from, sigma_to)) / span
