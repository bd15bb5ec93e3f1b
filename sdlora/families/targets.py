"""Which layers a LoRA adapts, per preset: the UNet's and the CLIP text encoders' (the SD and SDXL families')."""

# docs/lora-format.md, Targets: attention only, or attention + MLP as kohya trains by default.
UNET_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}
TEXT_TARGETS = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

# LoCon: kohya's networks/lora.py with conv_dim also adapts every Linear/Conv2d inside the UNet's ResnetBlock2D,
# Downsample2D and Upsample2D (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3). The 3x3 convolutions take conv_dim/conv_alpha;
# the 1x1 shortcut and the time-embedding Linear take the network's rank and alpha, as kohya's create_modules does.
# Module-name suffixes, as peft matches a list of target_modules.
UNET_CONV3X3_TARGETS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
UNET_CONV_OTHER_TARGETS = ["conv_shortcut", "time_emb_proj"]
