"""The few diffusion formulas training needs, written out so tests can check them against diffusers.

Notation (DDPM/DDIM, variance preserving): x_t = a_t x_0 + s_t eps with a_t = sqrt(alpha_bar_t),
s_t = sqrt(1 - alpha_bar_t); v = a_t eps - s_t x_0.
"""

from __future__ import annotations

import torch

from snapopt.train.accel import to_device


class Schedule:
    """alpha_bar over the training timesteps, from the pipeline's scheduler (SD: scaled_linear, 1000 steps)."""

    def __init__(self, scheduler, prediction_type: str = "epsilon"):
        self.alphas_cumprod = scheduler.alphas_cumprod.double().clone()
        self.num_train = len(self.alphas_cumprod)
        # DDIM's "previous" alpha_bar at the last step (diffusers: set_alpha_to_one=False -> alpha_bar_0)
        final = getattr(scheduler, "final_alpha_cumprod", None)
        self.final = float(final) if final is not None else float(self.alphas_cumprod[0])
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            from snapopt.errors import UsageError

            raise UsageError(f"unsupported prediction_type '{prediction_type}'; expected epsilon, v_prediction or sample")
        self.prediction_type = prediction_type

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer timesteps; t < 0 means 'after the last step'."""
        t = t.long().cpu()
        ab = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t < 0, torch.full_like(ab, self.final), ab)

    def coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = to_device(self.alpha_bar(t), like.device)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ab.sqrt().view(shape).to(like.dtype), (1 - ab).sqrt().view(shape).to(like.dtype)

    def add_noise(self, x0, noise, t):
        a, s = self.coeffs(t, x0)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        """What the model should predict under its prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self.coeffs(t, x0)
        return a * noise - s * x0

    def to_x0_eps(self, pred, x_t, t):
        """(x_0, eps) implied by a model output at x_t."""
        a, s = self.coeffs(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a, pred
        if self.prediction_type == "sample":
            return pred, (x_t - a * pred) / s
        x0 = a * x_t - s * pred
        return x0, s * x_t + a * pred

    def from_x0(self, x0, x_t, t):
        """The model output that implies ``x0`` at x_t (inverse of :meth:`to_x0_eps`)."""
        a, s = self.coeffs(t, x_t)
        eps = (x_t - a * x0) / s
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return a * eps - s * x0

    def ddim_step(self, pred, x_t, t, t_prev):
        """Deterministic DDIM (eta = 0) from t to t_prev given a model output."""
        x0, eps = self.to_x0_eps(pred, x_t, t)
        a, s = self.coeffs(t_prev, x_t)
        return a * x0 + s * eps

    def x0_for_one_step(self, x_t, x_target, t, t_prev):
        """The x_0 whose single DDIM step t -> t_prev lands on ``x_target`` (progressive distillation's target)."""
        a, s = self.coeffs(t, x_t)
        a2, s2 = self.coeffs(t_prev, x_t)
        r = s2 / s
        return (x_target - r * x_t) / (a2 - r * a)


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: u + w (c - u); ``scale`` a float or a per-sample tensor."""
    if torch.is_tensor(scale):
        scale = scale.view((-1,) + (1,) * (cond.dim() - 1)).to(cond.dtype)
    return uncond + scale * (cond - uncond)


class EpsilonOutput(torch.nn.Module):
    """A UNet that outputs v (or x_0), re-expressed to output epsilon: eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t
    (x_0: (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)). For runtimes whose schedulers assume epsilon, such as
    Apple's Swift pipeline: exact and elementwise, alpha_bar gathered from a constant table by the timestep
    input, so an exported package keeps the UNet's interface and the app's scheduler needs no change."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        if prediction_type not in ("v_prediction", "sample"):
            raise ValueError(f"EpsilonOutput converts v_prediction or sample outputs, not '{prediction_type}'")
        self.unet, self.prediction_type = unet, prediction_type
        ab = alphas_cumprod.double()
        self.register_buffer("sqrt_ab", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_ab", (1 - ab).sqrt().float(), persistent=False)

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kw):
        out = self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kw)[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).long().clamp(0, len(self.sqrt_ab) - 1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        shape = (-1,) + (1,) * (sample.dim() - 1)
        a, s = self.sqrt_ab[t].view(shape).to(out.dtype), self.sqrt_one_minus_ab[t].view(shape).to(out.dtype)
        eps = a * out + s * sample if self.prediction_type == "v_prediction" else (sample - a * out) / s
        if not return_dict:
            return (eps,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=eps)
