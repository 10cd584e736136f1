"""The linear algebra of MEMIT and AlphaEdit, on Flax kernels (``out = key @ W``, W is [F, D]).

MEMIT (Meng et al. 2023, eq. 14) spreads a residual R over a layer's down projection so that the
new keys K (rows, [n, F]) map to their targets while keys of the pre-training distribution,
summarised by C = E[k kᵀ] ([F, F]), move as little as possible:

    Δ = argmin ‖K (W + Δ) − (K W + R)‖² + λ tr(Δᵀ C Δ)
    ⇔ (λ C + Kᵀ K) Δ = Kᵀ R                                     (normal equations)

AlphaEdit (Fang et al. 2025) projects the update onto the null space of the preserved keys K0:
P = Û Ûᵀ with Û the eigenvectors of C whose eigenvalues are below a threshold, and solves

    (P (Kᵀ K + K_pᵀ K_p) + α I) Δ = P Kᵀ R

(K_p: keys of earlier edits in a sequence). Its solution is P·X for some X, so K0 Δ ≈ 0: the
preserved keys' outputs do not change at all.

Solves, never explicit inverses. These run in float64 when JAX has x64 enabled and in float32
otherwise; `solve_dtype` says which (see BUILD_NOTES: C's entries span many orders of
magnitude, which is why the seed uses float64; λ·C dominates the system and keeps it well
conditioned enough for float32 at d_ff <= 14336 in our checks).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl


def solve_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@jax.jit
def memit_delta(keys: jax.Array, resid: jax.Array, cov: jax.Array, lam: jax.Array | float) -> jax.Array:
    """Δ [F, D] solving (λ C + Kᵀ K) Δ = Kᵀ R for keys [n, F], residuals [n, D], C [F, F]."""
    dt = solve_dtype()
    k, r, c = keys.astype(dt), resid.astype(dt), cov.astype(dt)
    a = lam * c + k.T @ k
    # LU with pivoting rather than Cholesky: with a tiny λ the system is nearly singular and a
    # float32 Cholesky breaks down (NaN) where LU still returns the least-squares answer.
    return jnp.linalg.solve(a, k.T @ r).astype(jnp.float32)


@jax.jit
def null_space_projector(cov: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold (AlphaEdit)."""
    dt = solve_dtype()
    vals, vecs = jnp.linalg.eigh(cov.astype(dt))
    keep = (vals < threshold).astype(dt)
    return ((vecs * keep) @ vecs.T).astype(jnp.float32)


@jax.jit
def alphaedit_delta(keys: jax.Array, resid: jax.Array, projector: jax.Array, prev_kk: jax.Array,
                    alpha: jax.Array | float) -> jax.Array:
    """Δ [F, D] solving (P (Kᵀ K + K_pᵀ K_p) + α I) Δ = P Kᵀ R; prev_kk = K_pᵀ K_p [F, F]."""
    dt = solve_dtype()
    k, r, p = keys.astype(dt), resid.astype(dt), projector.astype(dt)
    a = p @ (k.T @ k + prev_kk.astype(dt)) + alpha * jnp.eye(k.shape[1], dtype=dt)
    return jnp.linalg.solve(a, p @ (k.T @ r)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CovarianceFactor:
    """A factorisation of C that solves C x = b without an explicit inverse (ROME's u = C⁻¹ k*).

    Cholesky when C is positive definite; a pivoted LU when it is only semi-definite (statistics
    from few samples), where Cholesky breaks down but LU still solves."""

    kind: str  # 'cholesky' (factor = lower L) or 'lu' (factor = (lu, pivots))
    factor: jax.Array | tuple[jax.Array, jax.Array]
    shape: tuple[int, int]  # C's shape, for the callers' checks

    def solve(self, b: jax.Array) -> jax.Array:
        """C⁻¹ b in the factor's dtype."""
        dt = (self.factor if self.kind == "cholesky" else self.factor[0]).dtype
        b = jnp.asarray(b, dt)
        if self.kind == "cholesky":
            return jsl.cho_solve((self.factor, True), b)
        return jsl.lu_solve(self.factor, b)


def covariance_factor(cov: jax.Array) -> CovarianceFactor:
    """Factorise C once (float32, float64 under x64): Cholesky, or LU where Cholesky yields NaN."""
    c = jnp.asarray(cov).astype(solve_dtype())
    chol = jnp.linalg.cholesky(c)  # NaN, not an exception, when C is not positive definite
    if bool(jnp.isfinite(chol).all()):
        return CovarianceFactor("cholesky", chol, c.shape)
    return CovarianceFactor("lu", jsl.lu_factor(c), c.shape)


class KeyStatistics(Protocol):
    """What the editors read from key statistics: device matrices derived from C = E[k kᵀ] [F, F]."""

    def second_moment_device(self, layer: int) -> jax.Array:  # C (MEMIT's λC)
        ...

    def second_moment_factor(self, layer: int) -> CovarianceFactor:  # solves C x = b (ROME's C⁻¹ k*)
        ...

    def projector(self, layer: int, threshold: float) -> jax.Array:  # AlphaEdit's null-space P
        ...
