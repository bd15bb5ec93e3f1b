"""Placeholder for the family objects (replaced at merge)."""

from __future__ import annotations

import torch

from sdlora.models import FAMILIES, detect_family, memory_defaults


class _Fam:
    def __init__(self, name):
        self.name = name
        spec = FAMILIES[name]
        self.label, self.sgm_unet = spec["label"], spec["sgm_unet"]
        self.xl = name == "sdxl"

    def tokenizers(self, pipe):
        return [pipe.tokenizer, pipe.tokenizer_2] if self.xl else [pipe.tokenizer]

    def text_encoder_models(self, pipe):
        return [pipe.text_encoder, pipe.text_encoder_2] if self.xl else [pipe.text_encoder]

    def encode(self, text_encoders, ids):
        if len(text_encoders) == 1:
            return text_encoders[0](ids[0])[0], None
        hidden, pooled = [], None
        for token_ids, text_encoder in zip(ids, text_encoders):
            out = text_encoder(token_ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, original_size, crop_top_left, bucket):
        if not self.xl:
            return None
        return torch.tensor([*original_size, *crop_top_left, bucket[1], bucket[0]], dtype=torch.float32)

    def denoiser_kwargs(self, pooled, time_ids):
        return {"text_embeds": pooled, "time_ids": time_ids} if self.xl else None

    def memory_defaults(self, free_gib):
        return memory_defaults(self.name, free_gib)


def get(name):
    return _Fam(name)


def of_pipe(pipe):
    return _Fam(detect_family(pipe))
