"""Batches for the step: which images a step trains on, their cached latents and text embeddings, and the inputs."""

from __future__ import annotations

import random

import torch

from sdlora import dataset as ds
from sdlora.config import TrainConfig
from sdlora.errors import UserError
from sdlora.objectives import randn


class Batches:
    """The inputs of every step, as a function of the step: `at(step)` gives this process's share of each of the
    step's micro-batches as dicts of tensors on the device (what `Step` takes).

    Latents (and loss masks, with masked_loss) are cached once per image (and per flip) unless crops are random; text
    embeddings once when the text encoders are frozen and captions do not change between steps (kohya refuses caching
    with shuffle for the same reason). With several processes each encodes its share and they swap results, so every
    entry is computed once.

    `reg_records`, the regularisation pictures, follow `records` in `self.records` (and `bucket_of` covers both):
    each epoch holds every picture with its repeats and, beside them, reg pictures making up `config.reg_ratio` of
    it; their samples' loss is weighted by `config.prior_loss_weight`.
    """

    def __init__(self, config: TrainConfig, records, bucket_of, pipe, family, objective, accelerator,
                 reg_records=(), texts_cached=lambda: None):
        self.config, self.records, self.bucket_of = config, list(records) + list(reg_records), bucket_of
        self.reg_from = len(records)  # records from this index on are regularisation pictures
        self.samples = ds.expand_repeats(records)
        if reg_records:
            self.samples += [self.reg_from + i for i in
                             ds.reg_samples(list(reg_records), len(self.samples), config.reg_ratio, config.seed)]
        self.family, self.objective, self.accelerator = family, objective, accelerator
        self.device = accelerator.device
        self.vae = pipe.vae
        self.tokenizers = family.tokenizers(pipe)
        text_encoders = family.encoders(pipe)
        self.processes = accelerator.num_processes
        self.seen = 0  # images trained so far, all processes together (a short batch counts what it holds)
        # the captions first: `texts_cached` can then take encoders the step never needs off the GPU before the VAE
        # encodes at full size (SD3.5's T5 is 4.7B parameters; the peak is the larger of the two, not their sum)
        self.texts = self.frozen_texts = None
        self.clip_skip = family.resolve_clip_skip(config.clip_skip)
        adapted = len(family.text_encoders)
        if not config.shuffle_tags:  # the captions are fixed ("" for those dropped)
            texts = sorted({r.caption for r in self.records} | {""})
            if not config.train_text_encoder:
                self.texts = _shared(accelerator, lambda share: cache_text(
                    self.tokenizers, text_encoders, family, texts, self.device, share, self.clip_skip))
                texts_cached()
            elif len(text_encoders) > adapted:  # CLIPs trained: T5's outputs still never change
                self.frozen_texts = _shared(accelerator, lambda share: cache_frozen_text(
                    self.tokenizers[adapted:], text_encoders[adapted:], family.token_lengths[adapted:], texts,
                    self.device, share))
                texts_cached()
        self.latents = _shared(accelerator, lambda share: cache_latents(
            self.vae, self.records, bucket_of, config.flip, family, self.device, share, masks=config.masked_loss)) \
            if config.cache_latents and not config.random_crop else None

    def per_epoch(self) -> int:
        """Batches in one epoch (of batch_size x processes images; a bucket's last one may be short)."""
        return batches_per_epoch(self.samples, self.bucket_of, self.config.batch_size * self.processes)

    def at(self, step: int) -> list[dict]:
        """This process's share of each micro-batch of optimizer step `step` (0-based)."""
        config, accelerator = self.config, self.accelerator
        micro_batches = []
        for micro in range(config.grad_accum):
            k = step * config.grad_accum + micro  # micro-batch index: the data position
            global_batch = batch_at(k, config, self.records, self.samples, self.bucket_of, self.processes)
            self.seen += len(global_batch)
            mine = slice(accelerator.process_index * config.batch_size,
                         (accelerator.process_index + 1) * config.batch_size)
            idx, captions, rngs, gens = (list(x) for x in zip(*global_batch[mine]))
            micro_batches.append(self._inputs(idx, captions, rngs, gens))
        return micro_batches

    def _inputs(self, idx, captions, rngs, gens) -> dict:
        config, device, family = self.config, self.device, self.family
        if self.latents is not None:
            flips = [config.flip and rng.random() < 0.5 for rng in rngs]
            mean, std, time_ids, masks = zip(*(self.latents[(i, f)] for i, f in zip(idx, flips)))
            mean, std = torch.stack(mean), torch.stack(std)
            time_ids = torch.stack(time_ids) if time_ids[0] is not None else None
            masks = torch.stack(masks) if config.masked_loss else None
        else:
            images = [ds.prepare_image_and_mask(self.records[i].image, self.records[i].mask if config.masked_loss
                                                else None, self.bucket_of[i], random_crop=config.random_crop,
                                                flip=config.flip, rng=rng) for i, rng in zip(idx, rngs)]
            pixels = torch.stack([im[0] for im in images]).to(device)
            time_ids = [family.time_ids(im[3], im[2], self.bucket_of[i]) for im, i in zip(images, idx)]
            time_ids = torch.stack(time_ids).to(device) if time_ids[0] is not None else None
            with torch.no_grad():
                dist = self.vae.encode(pixels).latent_dist
            check_finite(dist.mean, ", ".join(self.records[i].name for i in idx))
            mean, std = dist.mean, dist.std
            masks = torch.stack([latent_mask(im[1], mean.shape[-2:]) for im in images]).to(device) \
                if config.masked_loss else None
        inputs = {"mean": mean, "std": std, **step_randomness(mean.shape[1:], gens, self.objective, device)}
        if time_ids is not None:  # SDXL also conditions on each image's size, crop and target size
            inputs["time_ids"] = time_ids
        # Present in every batch of a run or in none: on a GPU they are inputs of the step's CUDA graph like the rest
        if masks is not None:
            inputs["mask"] = masks
        if self.reg_from < len(self.records):
            weights = torch.tensor([config.prior_loss_weight if i >= self.reg_from else 1.0 for i in idx])
            inputs["loss_weight"] = weights.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
                else weights
        if self.texts is not None:
            inputs["hidden"] = torch.stack([self.texts[c][0] for c in captions])
            if self.texts[captions[0]][1] is not None:
                inputs["pooled"] = torch.stack([self.texts[c][1] for c in captions])
        else:
            adapted = len(family.text_encoders)
            for j, tokenizer in enumerate(self.tokenizers):
                # a frozen encoder's cached output stands in for its token ids (Step.loss_and_grads tells them apart)
                inputs[f"ids_{j}"] = torch.stack([self.frozen_texts[c][j - adapted] for c in captions]) \
                    if self.frozen_texts is not None and j >= adapted \
                    else token_ids(tokenizer, captions, device, family.token_lengths[j])
        return inputs


def batch_at(k: int, config: TrainConfig, records, samples: list[int], bucket_of, processes: int = 1) -> list[tuple]:
    """The global micro-batch `k` (batch_size x processes images): per image its record index, its caption, and the
    random.Random and torch.Generator for its crop, flip, noise and timestep. Process p trains slice p.

    A pure function of (seed, k, processes): epochs are shuffled per (seed, epoch) and every image draws from its own
    seeded generators, so a resumed run sees what a run without a break would have, and N processes with batch B
    see what one process with batch N x B would.
    """
    size = config.batch_size * processes
    epoch, position = divmod(k, batches_per_epoch(samples, bucket_of, size))
    batch = ds.epoch_batches([bucket_of[i] for i in samples], size, random.Random(config.seed * 100_003 + epoch))[position]
    if processes > 1:  # a bucket's last batch, topped up so that no process is left without images
        batch = (batch * size)[:size]
    out = []
    for j, i in enumerate(batch):
        seed = (config.seed * 1_000_003 + k) * 4099 + j
        rng = random.Random(seed)
        caption = ds.build_caption(records[samples[i]].caption, shuffle=config.shuffle_tags,
                                   keep_tags=config.keep_tags, dropout=config.caption_dropout, rng=rng)
        out.append((samples[i], caption, rng, torch.Generator().manual_seed(seed)))
    return out


def batches_per_epoch(samples: list[int], bucket_of, size: int) -> int:
    """How many batches of `size` one epoch has: each bucket's images in batches, its last one possibly short."""
    return len(ds.epoch_batches([bucket_of[i] for i in samples], size, random.Random(0)))


def step_randomness(shape, generators, objective, device) -> dict:
    """Each image's randomness from its own generator: `eps` samples its latent from the cached distribution, then
    the objective's draws (noise, timesteps). Drawn on the host, copied without blocking."""
    drawn = {"eps": randn(shape, generators), **objective.draw(shape, generators)}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in drawn.items()}
    return drawn


def token_ids(tokenizer, captions: list[str], device, max_length: int = 0) -> torch.Tensor:
    """The captions' token ids, padded to `max_length` (0: the tokenizer's model_max_length) as the pipelines pad."""
    ids = tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids


@torch.no_grad()
def cache_text(tokenizers, text_encoders, family, texts: list[str], device, share=(0, 1), clip_skip: int = 0) -> dict:
    """caption -> (encoder_hidden_states, pooled or None) for this process's share of the captions, from the text
    encoders' layer `clip_skip` (0: the family's own)."""
    texts = texts[share[0]::share[1]]
    if not texts:
        return {}
    hidden, pooled = family.encode(text_encoders, [token_ids(tokenizer, texts, device, length)
                                                   for tokenizer, length in zip(tokenizers, family.token_lengths)],
                                   clip_skip or family.clip_skip)
    return {text: (hidden[i], None if pooled is None else pooled[i]) for i, text in enumerate(texts)}


@torch.no_grad()
def cache_frozen_text(tokenizers, encoders, lengths, texts: list[str], device, share=(0, 1)) -> dict:
    """caption -> (each frozen encoder's last hidden state,) for this process's share of the captions: what
    family.encode reads from encoders no adapter wraps (SD3's and FLUX.1's T5), when the others train."""
    texts = texts[share[0]::share[1]]
    if not texts:
        return {}
    outs = [encoder(token_ids(tokenizer, texts, device, length))[0]
            for tokenizer, encoder, length in zip(tokenizers, encoders, lengths)]
    return {text: tuple(out[i] for out in outs) for i, text in enumerate(texts)}


@torch.no_grad()
def cache_latents(vae, records, bucket_of, flip: bool, family, device, share=(0, 1), masks: bool = False) -> dict:
    """(record index, flipped) -> (mean, std, time_ids or None, mask or None): the VAE's latent distribution of the
    image centre-cropped to its bucket, the family's size/crop conditioning, and with `masks` the image's loss mask
    cropped and flipped with it, at latent resolution (`latent_mask`). The VAE runs in fp32."""
    cache = {}
    rng = random.Random(0)
    for i, (record, bucket) in enumerate(zip(records, bucket_of)):
        if i % share[1] != share[0]:
            continue
        pixels, mask, crop_top_left, original_size = ds.prepare_image_and_mask(
            record.image, record.mask if masks else None, bucket, random_crop=False, flip=False, rng=rng)
        time_ids = family.time_ids(original_size, crop_top_left, bucket)
        variants = [(False, pixels, mask)]
        if flip:
            variants.append((True, pixels.flip(-1), None if mask is None else mask.flip(-1)))
        for flipped, px, m in variants:
            dist = vae.encode(px[None].to(device, torch.float32)).latent_dist
            check_finite(dist.mean, record.name)
            cache[(i, flipped)] = (dist.mean[0], dist.std[0], None if time_ids is None else time_ids.to(device),
                                   latent_mask(m, dist.mean.shape[-2:]).to(device) if masks else None)
    return cache


def latent_mask(mask: torch.Tensor | None, size) -> torch.Tensor:
    """A loss mask (1, height, width) in pixels, as the weights of the latent pixels of `size` (height, width): the
    mean of the pixels each one covers (kohya's "area" interpolation); ones for an image without a mask."""
    if mask is None:
        return torch.ones(1, *size)
    return torch.nn.functional.interpolate(mask[None], size=tuple(size), mode="area")[0]


def check_finite(latents: torch.Tensor, images: str) -> None:
    # An fp16 VAE (SDXL's especially) overflows into inf/NaN; the VAE runs in fp32 here, so this catches broken VAE
    # weights before they turn into a NaN loss (kohya-ss/sd-scripts#952, Nerogar/OneTrainer#318).
    if not torch.isfinite(latents).all():
        raise UserError(f"the VAE gave NaN/inf latents for {images}",
                        "the base model's VAE weights are broken (an fp16 VAE that overflowed?); use a checkpoint "
                        "with a working VAE, or an fp16-fixed VAE baked in")


def _shared(accelerator, compute):
    """Run `compute(share)` with share = (process index, process count) on every process and merge the dicts, so
    each entry is computed once; tensors come back on this process's device."""
    n = accelerator.num_processes
    part = compute((accelerator.process_index, n))
    if n == 1:
        return part
    from accelerate.utils import gather_object

    merged = {}
    for piece in gather_object([{k: tuple(None if t is None else t.cpu() for t in v) for k, v in part.items()}]):
        merged.update(piece)
    return {k: tuple(None if t is None else t.to(accelerator.device) for t in v) for k, v in merged.items()}
