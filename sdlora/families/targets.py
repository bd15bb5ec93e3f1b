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
