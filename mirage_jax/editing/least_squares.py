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

import jax
import jax.numpy as jnp


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
