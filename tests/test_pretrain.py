"""The tiny base's pretraining script (sdlora/tiny/pretrain.py) run end to end on the CPU, a few steps per stage:
it writes a folder plain diffusers loads and draws with, logs what the run did, and starts a stage from a folder that
holds some of the parts (an autoencoder and a text encoder)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # renders a pool and checks the autoencoder on 240 pictures: about a minute a run

TINY_RUN = ["--arch", "x4c8w", "--pool", "64", "--workers", "1", "--vae-batch", "4", "--batch", "4", "--warmup", "1",
            "--log-every", "1", "--device", "cpu", "--seed", "0"]


def pretrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlora.tiny.pretrain", *TINY_RUN, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_pretraining_writes_a_base_plain_diffusers_draws_with_and_goes_on_from_the_parts_a_folder_holds(tmp_path):
    from diffusers import StableDiffusionPipeline

    first = tmp_path / "first"
    done = pretrain("--out", str(first), "--vae-steps", "2", "--unet-steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads((first / "pretrain_log.json").read_text())
    assert (log["summary"]["vae_steps"], log["summary"]["unet_steps"]) == (2, 2)
    check = log["summary"]["vae_check"]
    assert {"style_hatching_score_round_trips", "character_eye_pair_score_round_trips"} <= set(check)
    assert check["style_hatching_score_images"] > 0.1 and check["character_eye_pair_score_images"] > 0.5
    assert (first / "vae_recon.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(first))
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    # A folder with the autoencoder and the text encoder: the autoencoder stays as it is, the text encoder goes on from
    # where it was, the UNet starts from scratch
    init = tmp_path / "init"
    shutil.copytree(first / "vae", init / "vae")
    shutil.copytree(first / "text_encoder", init / "text_encoder")
    second = tmp_path / "second"
    done = pretrain("--out", str(second), "--init", str(init), "--vae-steps", "0", "--unet-steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    before = load_file(str(first / "vae" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(second / "vae" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    vae_config = json.loads((second / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == json.loads((first / "vae" / "config.json").read_text())["scaling_factor"]
    assert json.loads((second / "pretrain_log.json").read_text())["summary"]["unet_steps"] == 1

    def weights(folder, part, file):
        return load_file(str(folder / part / file))
    te_before, te_after = (weights(f, "text_encoder", "model.safetensors") for f in (first, second))
    moved = max((te_after[k].float() - te_before[k].float()).abs().max().item() for k in te_before)
    assert moved < 4e-3, moved  # one step on: the first run's text encoder, not a fresh one
    unet_before, unet_after = (weights(f, "unet", "diffusion_pytorch_model.safetensors") for f in (first, second))
    assert max((unet_after[k].float() - unet_before[k].float()).abs().max().item() for k in unet_before) > 0.05


def test_decoding_the_mean_needs_a_frozen_encoder(tmp_path):
    done = pretrain("--out", str(tmp_path / "x"), "--decode-mean")
    assert done.returncode == 2 and "--decode-mean needs --decoder-only" in done.stderr
