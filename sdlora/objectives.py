"""What the denoiser learns: how noise is drawn and added, the target it predicts, and each image's loss weight (DDPM
for SD1/SD2/SDXL, flow matching for SD3.5)."""

from __future__ import annotations

import torch


class DDPM:
    """The denoising objective of SD1/SD2/SDXL (DDPM training, as diffusers' examples train it): a random timestep
    per image, noise added by the scheduler, the target the noise itself (epsilon) or the velocity (v-prediction),
    Min-SNR-gamma loss weights and optional offset noise. A zero-terminal-SNR base (its scheduler config's
    `rescale_betas_zero_snr`, Lin et al. 2023) trains on the rescaled schedule: at the last timestep, 999, the noisy
    input is the noise alone and the v target is minus the latents.

    The step calls `noisy`, `target` and `weights` on the device and may be replayed as a CUDA graph, so they never
    wait for the host; `draw` runs on the host with each image's own generator. FlowMatching (SD3.5) answers the
    same calls.
    """

    def __init__(self, scheduler_config, *, min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                 debiased: bool = False, timestep_range: tuple[int, int | None] = (0, None)):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        # epsilon at zero SNR weighs 0/0 below and teaches nothing; loading refuses it (sdlora.models)
        assert self.prediction_type == "v_prediction" or not self.scheduler.config.rescale_betas_zero_snr
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.min_snr_gamma, self.noise_offset, self.debiased = min_snr_gamma, noise_offset, debiased
        # timesteps are drawn from [first, last): all of them unless a range is set
        self.first, self.last = timestep_range[0], min(timestep_range[1] or self.num_train_timesteps,
                                                       self.num_train_timesteps)

    def to(self, device) -> "DDPM":
        """Keep the noise schedule on `device` (diffusers moves it on first use, which a CUDA graph capture cannot)."""
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        return self

    def draw(self, shape, generators) -> dict[str, torch.Tensor]:
        """Per image, from its own generator (after the draws made before this one): `noise` of `shape` (one image's
        latent shape), what the model learns to remove (with offset noise,
        https://www.crosslabs.org/blog/diffusion-with-offset-noise), and `timesteps`, its noise level."""
        noise = randn(shape, generators)
        if self.noise_offset:
            noise += self.noise_offset * randn(shape[:1] + (1, 1), generators)
        timesteps = torch.cat([torch.randint(self.first, self.last, (1,), generator=g) for g in generators])
        return {"noise": noise, "timesteps": timesteps}

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each image's loss weight: Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556, as in
        diffusers' examples) and/or debiased estimation (Yu et al. 2024, https://arxiv.org/abs/2310.08442, as kohya
        applies it: 1/sqrt(SNR), 1/(SNR + 1) for v-prediction, the SNR capped at 1000); ones when neither is on.

        For v-prediction both divide by SNR + 1, never by the SNR, so the zero SNR of a zero-terminal-SNR schedule's
        last timestep gives finite weights: min-SNR's min(SNR, gamma) / (SNR + 1) is 0 there, as in kohya's
        apply_snr_weight and diffusers' train_text_to_image.py."""
        if not self.min_snr_gamma and not self.debiased:
            return torch.ones_like(timesteps, dtype=torch.float32)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        v = self.prediction_type == "v_prediction"
        weights = None
        if self.min_snr_gamma:
            weights = torch.clamp(snr, max=self.min_snr_gamma)
            weights = weights / (snr + 1) if v else weights / snr
        if self.debiased:  # at timestep 0 the SNR is huge: kohya caps it at 1000
            capped = torch.clamp(snr, max=1000.0)
            debiased = 1 / (capped + 1) if v else 1 / torch.sqrt(capped)
            weights = debiased if weights is None else weights * debiased
        return weights


def randn(shape, generators) -> torch.Tensor:
    """One standard-normal tensor of `shape` per image, each from that image's own generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


FLOW_TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
FLOW_LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


class FlowMatching:
    """Rectified-flow matching, as SD3 was trained (Esser et al. 2024, https://arxiv.org/abs/2403.03206) and as
    diffusers' train_dreambooth_lora_sd3.py trains it: per image a noise level sigma in (0, 1], the noisy input
    (1 - sigma) * latents + sigma * noise, the target the velocity noise - latents.

    Sigmas come from the scheduler's own (FlowMatchEulerDiscreteScheduler, whose `shift`, 3.0 for SD3.5, moves them
    towards noise): an index into its 1000 training sigmas, drawn by `sampling` (diffusers'
    compute_density_for_timestep_sampling: logit_normal with `logit_mean`/`logit_std`, mode with `mode_scale`, or
    uniform). `weighting` weighs each image's loss as diffusers' compute_loss_weighting_for_sd3 does: none, sigma_sqrt
    (1 / sigma^2) or cosmap. The timesteps the transformer takes are sigma x 1000, as the pipeline passes them.
    """

    def __init__(self, scheduler_config, *, sampling: str = "logit_normal", weighting: str = "none",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 noise_offset: float = 0.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        assert sampling in FLOW_TIMESTEP_SAMPLING and weighting in FLOW_LOSS_WEIGHTING
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.sampling, self.weighting = sampling, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.noise_offset = noise_offset

    def to(self, device) -> "FlowMatching":
        return self  # nothing on the device: sigmas are timesteps / 1000

    def draw(self, shape, generators) -> dict[str, torch.Tensor]:
        """Per image, from its own generator: `noise` of `shape` and `timesteps`, the scheduler's timestep (sigma x
        1000) at the index the sampling scheme draws."""
        noise = randn(shape, generators)
        if self.noise_offset:
            noise += self.noise_offset * randn(shape[:1] + (1, 1), generators)
        u = torch.cat([self._u(g) for g in generators])
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return {"noise": noise, "timesteps": self.scheduler.timesteps[indices].float()}

    def _u(self, generator) -> torch.Tensor:
        # diffusers.training_utils.compute_density_for_timestep_sampling, drawn from the image's own generator
        if self.sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(1, generator=generator))
        u = torch.rand(1, generator=generator)
        if self.sampling == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        return u

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each image's sigma, broadcastable over its latents."""
        return (timesteps.float() / self.num_train_timesteps).reshape(-1, 1, 1, 1)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps)
        return ((1.0 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise.float() - latents.float()

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each image's loss weight (diffusers' compute_loss_weighting_for_sd3)."""
        sigmas = timesteps.float() / self.num_train_timesteps
        if self.weighting == "sigma_sqrt":
            return sigmas ** -2.0
        if self.weighting == "cosmap":
            return 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return torch.ones_like(sigmas)


def make(family, scheduler_config, config, device) -> "DDPM | FlowMatching":
    """The objective a run of `config` trains `family`'s denoiser on, on `device`."""
    if family.objective == "flow":
        return FlowMatching(scheduler_config, sampling=config.flow_timestep_sampling,
                            weighting=config.flow_loss_weighting, logit_mean=config.flow_logit_mean,
                            logit_std=config.flow_logit_std, mode_scale=config.flow_mode_scale,
                            noise_offset=config.noise_offset)
    return DDPM(scheduler_config, min_snr_gamma=config.min_snr_gamma, noise_offset=config.noise_offset,
                debiased=config.debiased_estimation,
                timestep_range=(config.timestep_min, config.timestep_max)).to(device)
