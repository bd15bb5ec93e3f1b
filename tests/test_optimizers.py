"""Adaptive optimizers: each trains the tiny model from its package with its own defaults, is named in the file's
metadata as kohya names it, and a setting that fights it is said before the run wastes its steps."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import draw_dataset, small_config, tiny_latents
from sdlora.rundir import read_events


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("opt") / "shapes", n=4)


@pytest.mark.slow  # trains the tiny model
@pytest.mark.parametrize("optimizer, kohya_name", [
    ("prodigy", "prodigyopt.prodigy.Prodigy(d_coef=1.0,safeguard_warmup=True)"),
    ("adamw-schedulefree", "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
    ("adafactor", "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False,warmup_init=False)"),
])
def test_each_optimizer_trains_and_is_named_in_the_file(tmp_path, shapes, optimizer, kohya_name):
    from sdlora.config import build_config
    from sdlora.train import train

    defaults = build_config(optimizer=optimizer)
    config = small_config(shapes, steps=4, sample_every=100, save_every=100, optimizer=optimizer,
                          unet_lr=defaults.unet_lr, text_encoder_lr=defaults.text_encoder_lr,
                          lr_scheduler=defaults.lr_scheduler)
    run = tmp_path / "run"
    train(config, run, progress_bar=False)
    events = read_events(run)
    assert next(e for e in events if e["type"] == "done")["step"] == 4
    assert all(e["loss"] == e["loss"] for e in events if e["type"] == "progress")  # no NaN
    assert not [e for e in events if e["type"] == "warning" and optimizer.split("-")[-1] in e["message"].lower()]
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"] == kohya_name
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert any(u.abs().sum() > 0 for u in ups)  # the adapter moved from its zero start
    if optimizer == "adamw-schedulefree":  # the file holds its average, the checkpoint its training point
        from safetensors.torch import load_file

        training = load_file(str(run / "checkpoints" / "step-000004" / "adapters.safetensors"))
        in_training = sum(t.double().abs().sum() for k, t in training.items() if ".lora_B." in k)
        assert abs(sum(u.double().abs().sum() for u in ups) - in_training) > 1e-6 * in_training


def test_optimizer_defaults_and_settings_that_fight_them():
    from sdlora.config import build_config, optimizer_warnings

    prodigy = build_config(optimizer="prodigy")
    assert (prodigy.unet_lr, prodigy.text_encoder_lr) == (1.0, 1.0) and not optimizer_warnings(prodigy)
    assert build_config(optimizer="prodigy", unet_lr=0.5).unet_lr == 0.5  # what is set wins
    [said] = optimizer_warnings(build_config(optimizer="prodigy", unet_lr=5e-4))
    assert said.startswith("Prodigy finds its own step size") and "unet_lr 0.0005" in said
    free = build_config(optimizer="adamw-schedulefree")
    assert free.lr_scheduler == "constant" and not optimizer_warnings(free)
    [said] = optimizer_warnings(build_config(optimizer="adamw-schedulefree", lr_scheduler="cosine"))
    assert "lr_scheduler cosine works against it" in said
    assert build_config().unet_lr == 5e-4  # AdamW keeps its own


def test_schedule_free_samples_and_saves_its_averaged_weights():
    """Schedule-free AdamW steps at an interpolation of its iterates and their average; samples and saved files use
    the average (its eval mode), and training goes on from exactly where it was."""
    from accelerate import Accelerator

    from sdlora.batches import token_ids
    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.step import build_step

    pipe = load_base("tiny").pipe
    step = build_step(Accelerator(cpu=True), pipe, TrainConfig(dataset="-", rank=4, optimizer="adamw-schedulefree",
                                                               lr_scheduler="constant", unet_lr=1e-2, steps=10))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        step([{"mean": tiny_latents(2, g), "std": tiny_latents(2, g).abs() * 0.1,
               "eps": tiny_latents(2, g), "noise": tiny_latents(2, g),
               "timesteps": torch.randint(0, 1000, (2,), generator=g),
               "ids_0": token_ids(pipe.tokenizer, ["a red circle", "zxq"], torch.device("cpu"))}])
    training = [p.detach().clone() for p in step.params]
    with step.averaged_weights():
        averaged = [p.detach().clone() for p in step.params]
    assert any(not torch.equal(a, t) for a, t in zip(averaged, training))
    assert all(torch.allclose(p, t, atol=1e-7) for p, t in zip(step.params, training))


def test_loss_weightings_and_the_timestep_range_reach_the_loss():
    """Debiased estimation weights each image by 1/sqrt(SNR) (1/(SNR+1) for v-prediction, SNR capped at 1000), on
    top of min-SNR when both are on; a timestep range bounds the noise levels drawn. All of it from the run's config,
    through the objective the step calls."""
    from diffusers.training_utils import compute_snr

    from sdlora.config import TrainConfig
    from sdlora.errors import UserError
    from sdlora.objectives import DDPM
    from sdlora.tiny import MODEL_DIR

    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(Path(MODEL_DIR) / "scheduler")
    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(DDPMScheduler.from_config(config), t)
    debiased = DDPM(config, debiased=True).weights(t)
    assert torch.allclose(debiased, 1 / torch.sqrt(snr.clamp(max=1000)))
    both = DDPM(config, min_snr_gamma=5.0, debiased=True).weights(t)
    assert torch.allclose(both, DDPM(config, min_snr_gamma=5.0).weights(t) * debiased)
    v = DDPM({**config, "prediction_type": "v_prediction"}, debiased=True).weights(t)
    assert torch.allclose(v, 1 / (snr.clamp(max=1000) + 1))
    assert torch.equal(DDPM(config).weights(t), torch.ones(4))

    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    drawn = DDPM(config, timestep_range=(500, 600)).draw((4, 8, 8), gens)["timesteps"]
    assert drawn.min() >= 500 and drawn.max() < 600 and len(set(drawn.tolist())) > 10
    whole = DDPM(config).draw((4, 8, 8), [torch.Generator().manual_seed(i) for i in range(64)])["timesteps"]
    assert whole.max() >= 600 or whole.min() < 500
    with pytest.raises(UserError, match="timestep_max = 400: must be above timestep_min"):
        TrainConfig(dataset="d", timestep_min=500, timestep_max=400).validate()
