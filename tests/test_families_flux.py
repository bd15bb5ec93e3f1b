"""FLUX.1 bases: a small FLUX model (double- and single-stream transformer, 16-channel VAE, CLIP-L and T5) as a
diffusers folder and as a BFL-layout single file, trained through the CLI with flow matching on packed latents and
read back by diffusers' own loader; dev and schnell told apart, the shipped configs, and LoRAs refused across
families."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import draw_dataset, render_sample
from sdlora import families
from sdlora.errors import UserError
from sdlora.families.naming import flux_original
from sdlora.models import CONFIGS_DIR, inspect_checkpoint, load_base
from sdlora.rundir import read_events


def build_flux(dev: bool = True):
    """A small random-init FLUX.1 pipeline: one double and one single block 32 wide (dev: with the guidance
    embedder), a 16-channel VAE that shifts and scales its latents as FLUX.1's does, a CLIP-L-like encoder 32 wide and
    a T5 encoder 96 wide. The tokenizers are the tiny model's CLIP one; the T5 slot takes it too (the pipeline pads it
    to T5's 512 or 256 tokens), since T5's sentencepiece model is not shipped."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from sdlora.tiny import MODEL_DIR

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                                         pooled_projection_dim=32, guidance_embeds=dev, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR, subfolder="tokenizer")
    # the published schedulers: dev shifts by resolution while sampling, schnell not at all
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096) if dev \
        else FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer)
