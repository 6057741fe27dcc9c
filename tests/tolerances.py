"""Tolerances for tests that compare floating-point results, each derived from its invariant.

The invariants the numerics tests check (1x4 == 4x1 accumulation, TP2 == TP1, packed == alone,
trainer == vLLM engine) hold exactly in real arithmetic. In floating point the two sides run the
same operations in another order or grouping: other kernels (torch picks AVX-512 or AVX2 code by
CPU, `ATEN_CPU_CAPABILITY=avx2` forces the latter; vLLM has kernels of its own), a matmul split
over TP ranks, a token sum split over micro-batches or DP ranks. They differ by rounding only.
So a tolerance here is a rounding bound in units of the unit roundoff `u` of the dtype and of the
scale of what was summed -- never a number measured on one machine -- and a real bug (a wrong
weight mapping, a skipped micro-batch, a wrong normalisation) is many orders of magnitude above
it. What guarantees what:

- `reorder_atol(x, n)`: two evaluations of the same sums of up to `n` terms (a gradient element
  sums over the n tokens of a step; a loss over its n loss tokens), grouped differently, differ
  by at most ~n*u times the terms' scale (the worst case of one recursive sum is
  gamma_n * sum|terms| with gamma_n ~ n*u). The scale is the largest entry of the result, the
  observable size of the terms. Measured on an AVX-512 Intel CPU, default and AVX2 kernels:
  1x4 vs 4x1 gradients differ by <= 7u * max|G| per tensor, the bound for n = 128 is 128u.
- `adamw_first_step_bound(...)`: AdamW's first step moves an element by
  lr * g / (|g| + eps) (plus decay, the same on both sides). That map is smooth where |g| >> eps
  and amplifies a rounding-level difference of g by up to lr / eps where |g| <= eps: an element
  whose gradient is ~0 can move by anything up to lr in either direction. The bound is the map's
  Lipschitz constant on the interval between the two gradients, times their difference, capped
  at 2 lr, plus the rounding of the update itself. Tight where the step is well-conditioned,
  honest where it is not; the gradients themselves are compared tightly beforehand.
- `adamw_steps_bound(...)`: the same for several steps, from Adam's per-element denominator
  sqrt(v_hat) (its smallest value over the steps) and a bound on the gradient difference: tight
  for the elements whose denominator stays >> eps, up to ~2 lr per step for the others.
- `LOGPROB_ATOL`: log-probabilities of the same tokens from two float32 implementations of the
  same model (megatron-core at any TP/PP, HF transformers, the vLLM engine). log_softmax is
  2-Lipschitz in the largest logit difference; the logits of the tiny test models (hidden
  <= 128, <= 4 layers, |logit| <= ~10) carry a float32 rounding error of at most
  ~depth * hidden * u * |logit| ~ 1e-5 per implementation (measured 2026-12 on an AVX-512 Intel
  CPU, default and AVX2 torch kernels: <= 3e-6 megatron vs HF, <= 6e-6 vLLM vs HF; 3e-5 vLLM vs
  HF was seen on an AVX2-only AMD CPU). A wrong mapping changes logprobs by 1e-1 to 5 (gate/up swapped: 3.7;
  q/k/v concatenated instead of interleaved: 5.6), a stale weight version by > 1e-2; tests
  assert such a control is far above the bound wherever they can.
"""

from __future__ import annotations

import math

import torch

LOGPROB_ATOL = 1e-4


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the distance from 1.0 to the next representable number (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def reorder_atol(x: torch.Tensor, num_terms: int) -> float:
    """Absolute bound on |a - b| for two evaluations of `x` that sum `num_terms` terms each in
    another grouping (micro-batches, DP or TP ranks, vector width): num_terms * u * max|x|."""
    return num_terms * unit_roundoff(x.dtype) * float(x.detach().abs().max())


def reorder_rtol(num_terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative bound for a sum of `num_terms` terms of one sign (a loss over its tokens): the
    relative error of such a sum is at most gamma_n ~ n * u on either side."""
    return 2 * num_terms * unit_roundoff(dtype)


def _ulp(w: torch.Tensor, reach: float) -> torch.Tensor:
    """Spacing of floats of w's dtype at |w| + reach (the largest operand an update rounds at)."""
    a = w.detach().abs() + reach
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def adamw_first_step_bound(grad_a: torch.Tensor, grad_b: torch.Tensor, weight: torch.Tensor, *,
                           lr: float, eps: float) -> torch.Tensor:
    """Per-element bound on |w_a - w_b| after one AdamW step from the same weights and zero
    state (`weight`: before the step), given the two gradients (bias-corrected first step:
    w -= lr * g / (|g| + eps)).

    f(g) = g / (|g| + eps) has f'(g) = eps / (|g| + eps)^2, largest (1 / eps) at g = 0, and
    |f| < 1: |f(g_a) - f(g_b)| <= min(2, |g_a - g_b| * eps / (m + eps)^2), m the smallest |g| on
    the interval between them (0 if their signs differ). The rounding of the update (a few
    operations, relative u each) and of the new weight (half an ulp each side) is added.
    """
    g_a, g_b = grad_a.double(), grad_b.double()
    same_sign = torch.sign(g_a) == torch.sign(g_b)
    m = torch.where(same_sign, torch.minimum(g_a.abs(), g_b.abs()), torch.zeros_like(g_a))
    lipschitz = (g_a - g_b).abs() * eps / (m + eps) ** 2
    u = unit_roundoff(weight.dtype)
    return lr * torch.clamp(lipschitz, max=2.0) + 8 * u * lr + 2 * _ulp(weight, 2 * lr)


def adam_ratio_cap(step: int, beta1: float, beta2: float) -> float:
    """Largest |m_hat / sqrt(v_hat)| Adam can reach at `step` (1-based), whatever the gradients
    (Cauchy-Schwarz on the two moving averages); 1 at step 1, ~1 for the first few steps."""
    r = beta1 * beta1 / beta2
    total = sum(r**j for j in range(step))
    return (math.sqrt(1 - beta2**step) / (1 - beta1**step) * (1 - beta1) / math.sqrt(1 - beta2)
            * math.sqrt(total))


def adamw_steps_bound(denom_min: torch.Tensor, grad_atol: float | torch.Tensor,
                      weight: torch.Tensor, *, lrs: list[float], eps: float, beta1: float = 0.9,
                      beta2: float = 0.999) -> torch.Tensor:
    """Per-element bound on |w_a - w_b| after len(lrs) AdamW steps from the same weights
    (`weight`, before the steps), when
    the (clipped) gradients of every step differ by at most `grad_atol`.

    `denom_min` is the smallest sqrt(v_hat) of each element over the steps on one side. Step t
    moves an element by lr_t * r_t, r_t = m_hat / (sqrt(v_hat) + eps). Perturbing every past
    gradient by <= d moves m_hat (a weighted mean) by <= d and sqrt(v_hat) (a weighted L2 norm)
    by <= d, so |delta r_t| <= (1 + cap_t) * d / (max(sqrt(v_hat) - d, 0) + eps), and never more
    than 2 * cap_t (cap_t = `adam_ratio_cap`). Decoupled weight decay only shrinks a difference.
    Left out, as second order: a weight difference feeding back into later gradients.
    """
    s = denom_min.double()
    d = torch.as_tensor(grad_atol, dtype=torch.float64)
    bound = torch.zeros_like(s)
    for t, lr in enumerate(lrs, start=1):
        cap = adam_ratio_cap(t, beta1, beta2)
        bound += lr * torch.clamp((1 + cap) * d / ((s - d).clamp(min=0) + eps), max=2 * cap)
    u = unit_roundoff(weight.dtype)
    return bound + 8 * u * sum(lrs) + 2 * len(lrs) * _ulp(weight, 2 * sum(lrs))
