"""The functional FIPO math: Future-KL, the FIPO / DAPO / GRPO losses, advantages, packing.

Everything under `fipo_jax.core` imports only itself, jax and numpy: it is exactly what
`pip install fipo_jax` (no extras) brings, and what `import fipo_jax` re-exports.
"""
