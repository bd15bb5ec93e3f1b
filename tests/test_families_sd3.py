"""SD3.5 bases: a small SD3 model (MMDiT-X transformer, 16-channel VAE, two CLIPs and a T5) as a diffusers folder and
as an original-layout single file, trained through the CLI with flow matching and read back by diffusers' own loader;
family detection, the objective, and LoRAs refused across families."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import draw_dataset, render_sample
from sdlora import families
from sdlora.errors import UserError
from sdlora.families.naming import original_layout
from sdlora.models import CONFIGS_DIR, inspect_checkpoint, load_base
from sdlora.rundir import read_events


def build_sd3():
    """A small random-init SD3.5-Medium-like pipeline: a 2-block MMDiT-X transformer (block 0 with the second image
    attention, qk RMS norms), a 16-channel VAE that shifts and scales its latents, CLIP-L- and CLIP-G-like encoders with
    projections (32 and 48 wide), and a T5 encoder 96 wide. The CLIP tokenizers are the shipped ones; the T5 slot takes
    the CLIP tokenizer too (the pipeline pads it to 256 tokens like T5's), since T5's sentencepiece is not shipped."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                        sample_size=64, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)

    def clip(width, act):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=32, bos_token_id=0,
            eos_token_id=2, pad_token_id=1))

    clip_l = clip(32, "quick_gelu")
    with torch.no_grad():  # SD3's CLIP-L projection is the identity: single files leave it out (diffusers' loader)
        clip_l.text_projection.weight.copy_(torch.eye(32))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIGS_DIR / "sd3.5-medium" / "tokenizer"))
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip(48, "gelu"),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(CONFIGS_DIR / "sd3.5-medium" / "tokenizer_2")),
        text_encoder_3=t5, tokenizer_3=tokenizer)


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory):
    """(diffusers folder, original-layout single file) of the small SD3 model, made once."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = build_sd3()
    folder = root / "sd3"
    pipe.save_pretrained(str(folder))
    single = root / "sd3.safetensors"
    save_file(original_layout(pipe, families.get("sd3.5-medium")), str(single))
    return folder, single


TRAIN = ["--resolution", "64", "--steps", "3", "--batch-size", "2", "--rank", "4", "--alpha", "2", "--trigger", "zxq",
         "--sample-every", "3", "--save-every", "3", "--sample-steps", "3", "--unet-lr", "5e-2",
         "--text-encoder-lr", "1e-2", "--lr-scheduler", "constant", "--warmup-fraction", "0", "--quiet"]


@pytest.fixture(scope="session")
def sd3_run(sd3_model, tmp_path_factory):
    """A run folder: three steps through the CLI on the folder, the CLIP text-encoder LoRAs on."""
    from sdlora.cli import main

    data = draw_dataset(tmp_path_factory.mktemp("sd3data") / "shapes", n=4, size=80)
    run = tmp_path_factory.mktemp("sd3runs") / "run"
    assert main(["train", str(data), "--base", str(sd3_model[0]), "--out", str(run), "--train-text-encoder",
                 *TRAIN]) == 0
    return run
