"""A PyTorch transcription of the official FIPO / DAPO losses, written from the spec
(shared/reference/fipo_spec.md §2 and §5), for cross-checks and side-by-side benchmarks.

It follows the official algorithm step by step, including its O(T²) chunked
distance-matrix Future-KL (chunk 128) and its token-mean over the micro-batch. It is not
the official source; parity with the official release itself is checked against the
golden cases in tests/golden.
"""

from __future__ import annotations

import math

import torch


def future_kl_chunked(x: torch.Tensor, gamma: float, chunk_size: int = 128) -> torch.Tensor:
    """F[b, i] = Σ_j γ^{j−i}·1[j ≥ i]·x[b, j], accumulated over column chunks of j."""
    batch, length = x.shape
    out = torch.zeros_like(x)
    pos_i = torch.arange(length, device=x.device).unsqueeze(1)
    gamma_t = torch.tensor(gamma, dtype=x.dtype, device=x.device)
    for start in range(0, length, chunk_size):
        end = min(length, start + chunk_size)
        distance = torch.arange(start, end, device=x.device).unsqueeze(0) - pos_i
        decay = torch.pow(gamma_t, distance.clamp(min=0)) * (distance >= 0).to(x.dtype)
        out = out + x[:, start:end] @ decay.t()
    return out


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss: str = "fipo",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    decay_rate: float = 32.0,
    influence_clip: float = 0.2,
    high_only: bool = True,
    safety: float = 10.0,
    drop_sequences: bool = True,
    future_kl_filter: bool = True,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean FIPO ("fipo") or DAPO ("dapo") loss and the main metrics."""
    mask = response_mask.to(log_prob.dtype)

    def masked_mean(v, m):
        return (v * m).sum() / (m.sum() + 1e-8)

    d = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(d)
    metrics = {"ppo_kl": masked_mean(-d, mask)}
    weighted = advantages
    if loss == "fipo":
        keep = d <= math.log(clip_c) if future_kl_filter else torch.ones_like(d, dtype=torch.bool)
        x = d * mask * keep.to(d.dtype)
        future = future_kl_chunked(x, 2.0 ** (-1.0 / decay_rate), chunk_size)
        raw = torch.exp(future)
        if influence_clip != 0.0:
            lo = 1.0 if high_only else 1.0 - influence_clip
            weights = torch.clamp(raw, min=lo, max=1.0 + influence_clip)
        else:
            weights = torch.clamp(raw, max=10.0)
        risky = (advantages < 0) & (ratio > safety)
        weights = torch.where(risky, torch.clamp(weights, 0.8, 1.0), weights).detach()
        metrics["influence_weights_mean"] = masked_mean(weights, mask)
        weighted = advantages * weights
    l1 = -weighted * ratio
    l2 = -weighted * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    ppo = torch.maximum(l1, l2)
    metrics["pg_clipfrac"] = masked_mean(torch.gt(l2, l1).float(), mask)
    l3 = -weighted * clip_c
    dual = torch.min(l3, ppo)
    metrics["pg_clipfrac_lower"] = masked_mean(torch.gt(ppo, l3).float() * (advantages < 0).float(), mask)
    final_mask = mask
    if loss == "fipo" and drop_sequences:
        hits = ((advantages < 0) & (ppo > l3) & response_mask.bool()).sum(dim=1)
        final_mask = mask * (hits <= 1).unsqueeze(1).to(mask.dtype)
    per_token = torch.where(weighted < 0, dual, ppo)
    return masked_mean(per_token, final_mask), metrics
