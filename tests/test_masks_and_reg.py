"""Loss masks and regularisation pictures: how ingest finds them, how they reach the batches, the loss and the saved
file, on pictures drawn here and the embedded tiny model."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import draw_dataset, small_config, tiny_latents
from sdlora import dataset as ds
from sdlora import workspace as ws
from sdlora.app import tab_pictures
from sdlora.config import TrainConfig
from sdlora.errors import UserError
from sdlora.rundir import read_events


def half_mask(size, keep="left"):
    """A mask of `size` (width, height): white on one half, black on the other."""
    mask = Image.new("L", size, 0)
    w, h = size
    mask.paste(255, (0, 0, w // 2, h) if keep == "left" else (w // 2, 0, w, h))
    return mask


@pytest.fixture(scope="module")
def tiny():
    """The tiny base and a step built on it (min-SNR off, so each image's loss weight is 1), shared by the loss
    tests: building them is most of what these tests cost."""
    from accelerate import Accelerator

    from sdlora.models import load_base
    from sdlora.step import build_step

    pipe = load_base("tiny").pipe
    accelerator = Accelerator(cpu=True)
    config = TrainConfig(dataset="-", rank=4, alpha=4.0, min_snr_gamma=0.0, lr_scheduler="constant",
                         warmup_fraction=0.0)
    step = build_step(accelerator, pipe, config)
    with torch.no_grad():  # a non-zero B, so the adapters change the prediction
        for p in step.params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return SimpleNamespace(pipe=pipe, step=step, accelerator=accelerator)


def step_inputs(tiny, n=2, seed=0):
    from sdlora.batches import token_ids

    g = torch.Generator().manual_seed(seed)
    return {"mean": tiny_latents(n, g), "std": tiny_latents(n, g).abs() * 0.1,
            "eps": tiny_latents(n, g), "noise": tiny_latents(n, g),
            "timesteps": torch.randint(0, 1000, (n,), generator=g),
            "ids_0": token_ids(tiny.pipe.tokenizer, ["a red circle", "a blue square"][:n], torch.device("cpu"))}


# ---------------------------------------------------------------- ingest

def test_mask_files_pair_with_their_pictures_and_are_never_pictures(tmp_path):
    draw_dataset(tmp_path, n=3, size=32)
    grey = Image.new("L", (32, 32), 0)
    grey.paste(128, (0, 0, 16, 32))
    grey.save(tmp_path / "img00_mask.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "img01_MASK.jpg", quality=95)  # any image type
    Image.new("L", (32, 32), 255).save(tmp_path / "gone_mask.png")  # its picture is not there
    draw_dataset(tmp_path / "2_sub", n=1, size=32)
    half_mask((32, 32)).save(tmp_path / "2_sub" / "img00_mask.webp", lossless=True)

    data = ds.ingest(tmp_path)
    records = {r.name: r for r in data.records}
    assert sorted(records) == ["2_sub/img00.png", "img00.png", "img01.png", "img02.png"]
    mask = np.asarray(records["img00.png"].mask)
    assert records["img00.png"].mask.mode == "L" and mask.shape == (32, 32)
    assert (mask[:, :16] == 128).all() and (mask[:, 16:] == 0).all()
    assert np.asarray(records["img01.png"].mask).min() >= 250
    assert records["img02.png"].mask is None  # no mask file: trains unmasked
    assert np.array_equal(np.asarray(records["2_sub/img00.png"].mask), np.asarray(half_mask((32, 32))))
    assert data.rejected == []
    assert data.warnings == ["1 mask file has no picture of the same name (ignored; a picture's name must not end in "
                             "_mask): gone_mask.png"]
    assert ds.has_masks(data.records)


def test_a_mask_of_another_size_is_stretched_to_its_picture_with_a_warning(tmp_path):
    Image.new("RGB", (64, 32), (200, 30, 30)).save(tmp_path / "wide.png")
    half_mask((16, 16)).save(tmp_path / "wide_mask.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "b_mask.png").write_bytes(b"not a picture")
    data = ds.ingest(tmp_path)
    wide = next(r for r in data.records if r.name == "wide.png")
    assert wide.mask.size == (64, 32)
    mask = np.asarray(wide.mask)
    assert (mask[:, :28] == 255).all() and (mask[:, 36:] == 0).all()
    assert "wide_mask.png is 16 x 16 pixels and its picture 64 x 32: the mask was resized to the picture" in \
        data.warnings
    b = next(r for r in data.records if r.name == "b.png")
    assert b.mask is None
    assert dict(data.rejected)["b_mask.png"] == "mask not used: not an image or unsupported format; picture used " \
                                                "without it"


def test_alpha_mask_reads_the_pictures_transparency(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (16, 0, 32, 32))
    rgba.paste((200, 30, 30, 64), (0, 0, 16, 8))
    rgba.save(tmp_path / "cut.png")
    Image.new("RGBA", (32, 32), (10, 200, 10, 255)).save(tmp_path / "opaque.png")  # an alpha channel, all opaque
    rgba.save(tmp_path / "both.png")
    Image.new("L", (32, 32), 200).save(tmp_path / "both_mask.png")

    records = {r.name: r for r in ds.ingest(tmp_path, alpha_mask=True).records}
    alpha = np.asarray(records["cut.png"].mask)
    assert np.array_equal(alpha, np.asarray(rgba.getchannel("A")))
    assert records["opaque.png"].mask is None
    assert (np.asarray(records["both.png"].mask) == 200).all()  # a mask file wins over transparency
    assert records["cut.png"].image.getpixel((20, 20)) == (255, 255, 255)  # the picture itself is as without masks
    plain = {r.name: r for r in ds.ingest(tmp_path).records}
    assert plain["cut.png"].mask is None and plain["both.png"].mask is not None
    assert plain["cut.png"].image.tobytes() == records["cut.png"].image.tobytes()


def test_a_mask_is_cropped_resized_and_flipped_with_its_picture():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, (6, 10)).astype(np.uint8) * 255  # big blocks: resizing blurs only their edges
    big = np.kron(blocks, np.ones((20, 20), np.uint8))  # 120 x 200
    image = Image.fromarray(np.stack([big] * 3, axis=-1))
    mask = Image.fromarray(big)
    flips = set()
    for seed in range(12):
        pixels, weights, crop, original = ds.prepare_image_and_mask(image, mask, (128, 64), random_crop=True,
                                                                    flip=True, rng=random.Random(seed))
        # the same random draws as without a mask: same crop, same flip
        alone = ds.prepare_image(image, (128, 64), random_crop=True, flip=True, rng=random.Random(seed))
        assert torch.equal(pixels, alone[0]) and (crop, original) == alone[1:]
        assert weights.shape == (1, 64, 128) and 0 <= weights.min() and weights.max() <= 1
        as_weight = (pixels[0] + 1) / 2  # the picture's own brightness: where the mask must be white
        assert (weights[0] - as_weight).abs().mean() < 0.02
        flips.add(bool(torch.equal(pixels, ds.prepare_image(image, (128, 64), random_crop=True, flip=False,
                                                            rng=random.Random(seed))[0])))
    assert flips == {True, False}  # both flipped and unflipped crops were checked


def test_masks_are_cached_with_the_latents_at_latent_resolution(tiny, tmp_path):
    from sdlora import families
    from sdlora.batches import cache_latents

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    half_mask((64, 64)).save(tmp_path / "a_mask.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "b.png")
    records = ds.ingest(tmp_path).records
    family = families.detect(tiny.pipe)
    cache = cache_latents(tiny.pipe.vae, records, [(64, 64)] * 2, True, family, torch.device("cpu"), masks=True)
    mean, _, _, mask = cache[(0, False)]
    side = 64 // tiny.pipe.vae_scale_factor  # latent side
    assert mask.shape == (1, *mean.shape[-2:]) == (1, side, side)
    assert (mask[0, :, :side // 2] == 1).all() and (mask[0, :, side // 2:] == 0).all()
    assert torch.equal(cache[(0, True)][3], mask.flip(-1))  # the flipped latents get the flipped mask
    assert torch.equal(cache[(1, False)][3], torch.ones(1, side, side))  # no mask: ones
    assert cache_latents(tiny.pipe.vae, records, [(64, 64)] * 2, False, family, torch.device("cpu"))[(0, False)][3] \
        is None


# ---------------------------------------------------------------- the loss

def test_the_mask_weighs_the_loss_per_latent_pixel(tiny):
    """Where the mask is 0 the prediction gets no gradient at all (so nothing there is learned), and the loss is
    kohya's: mean(error * mask), not renormalised by the mask's area. A mask of ones is no mask."""
    inputs = step_inputs(tiny)
    size = inputs["mean"].shape[-1]  # the mask is at latent resolution: left half kept, right half off
    mask = torch.ones(2, 1, size, size)
    mask[:, :, :, size // 2:] = 0
    mask[1, :, :2, :size // 2] = 0.5
    seen = {}

    def keep(module, args, output):
        seen["pred"] = output.sample.detach().float()
        output.sample.register_hook(lambda grad: seen.__setitem__("grad", grad))

    hook = tiny.step.unet.register_forward_hook(keep)
    try:
        loss, grads = tiny.step.loss_and_grads(**inputs, mask=mask)
    finally:
        hook.remove()
    error = (seen["pred"] - inputs["noise"]) ** 2  # epsilon prediction: the target is the noise
    assert loss.item() == pytest.approx((error * mask).mean().item(), rel=1e-5)
    assert (seen["grad"][:, :, :, size // 2:] == 0).all()
    assert (seen["grad"][:, :, :, :size // 2] != 0).all()
    left = (1, slice(None), slice(0, 2), slice(0, size // 2))
    assert torch.allclose(seen["grad"][left], 0.5 * 2 * (seen["pred"] - inputs["noise"])[left]
                          / error.numel(), rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads)

    whole, _ = tiny.step.loss_and_grads(**inputs)
    ones, _ = tiny.step.loss_and_grads(**inputs, mask=torch.ones(2, 1, size, size))
    assert torch.equal(whole, ones) and loss < whole


def test_prior_loss_weight_multiplies_each_samples_loss(tiny):
    inputs = step_inputs(tiny, seed=1)

    def loss(*weights):
        return tiny.step.loss_and_grads(**inputs, loss_weight=torch.tensor(weights))[0].item()

    first, second, both = loss(1.0, 0.0), loss(0.0, 1.0), loss(1.0, 1.0)
    assert first > 0 and second > 0 and first + second == pytest.approx(both, rel=1e-5)
    assert loss(1.0, 0.25) == pytest.approx(first + 0.25 * second, rel=1e-5)
    assert both == pytest.approx(tiny.step.loss_and_grads(**inputs)[0].item(), rel=1e-6)  # ones: as without


# ---------------------------------------------------------------- batches

def test_reg_pictures_fill_their_share_of_every_epoch_with_their_weight(tiny, tmp_path):
    from sdlora import families
    from sdlora.batches import Batches, batch_at

    data_dir, reg_dir = tmp_path / "data", tmp_path / "reg"
    draw_dataset(data_dir / "2_me", n=3, size=32)  # 6 samples an epoch
    draw_dataset(data_dir, n=2, size=32, seed=1)  # 2 more
    for i, repeats in enumerate((3, 1, 1)):
        folder = reg_dir / (f"{repeats}_person" if repeats > 1 else "")
        draw_dataset(folder, n=1, size=32, seed=10 + i, captions=False)
        (folder / "img00.png").rename(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"a photo of person {i}")
    data, reg = ds.ingest(data_dir, trigger="zxq"), ds.ingest(reg_dir)
    config = small_config(data_dir, reg_data=str(reg_dir), reg_ratio=0.6, prior_loss_weight=0.3, batch_size=2,
                          cache_latents=False)
    bucket_of = [(64, 64)] * (len(data.records) + len(reg.records))
    batches = Batches(config, data.records, bucket_of, tiny.pipe, families.detect(tiny.pipe),
                      tiny.step.objective, tiny.accelerator, reg.records)

    per_epoch = batches.per_epoch()
    captions = [c for k in range(per_epoch)
                for _, c, _, _ in batch_at(k, config, batches.records, batches.samples, bucket_of)]
    reg_captions = [c for c in captions if c.startswith("a photo of person")]
    assert len(captions) == 8 + 12 and len(reg_captions) == 12  # 12 / 20 = reg_ratio 0.6
    assert not any("zxq" in c for c in reg_captions)  # the trigger is the dataset's, not the class pictures'
    # repeats apply: 3_person/r0 is 3 of the 5 places in the reg pool, which 12 samples go round twice and a bit
    counts = [reg_captions.count(f"a photo of person {i}") for i in range(3)]
    assert 6 <= counts[0] <= 9 and all(2 <= c <= 3 for c in counts[1:]), counts

    for step in range(per_epoch):
        (inputs,) = batches.at(step)
        idx = [i for i, _, _, _ in batch_at(step, config, batches.records, batches.samples, bucket_of)]
        expected = [0.3 if i >= batches.reg_from else 1.0 for i in idx]
        assert inputs["loss_weight"].tolist() == pytest.approx(expected)
    assert "mask" not in inputs  # masked_loss off: no mask in the step


def test_reg_samples_cycle_in_a_seeded_order():
    records = [ds.Record(f"r{i}.png", None, "a person", repeats, True) for i, repeats in enumerate((3, 1))]
    assert sorted(ds.reg_samples(records, 8, 0.5, seed=0)) == [0] * 6 + [1] * 2  # the 4 of the pool, twice
    few = ds.reg_samples(records, 2, 0.5, seed=0)
    assert len(few) == 2 and few == ds.reg_samples(records, 2, 0.5, seed=0)
    assert {tuple(ds.reg_samples(records, 1, 0.5, seed=s)) for s in range(20)} == {(0,), (1,)}


# ---------------------------------------------------------------- settings and errors

def test_settings_are_checked_where_they_arrive(tmp_path):
    data = draw_dataset(tmp_path / "data", n=1, size=16)
    for values, message in [
        ({"alpha_mask": True}, "alpha_mask = True: gives masks to masked_loss"),
        ({"reg_ratio": 1.0}, "reg_ratio = 1.0: must be above 0 and below 1"),
        ({"reg_ratio": 0.0}, "reg_ratio = 0.0: must be above 0 and below 1"),
        ({"prior_loss_weight": -1.0}, "prior_loss_weight = -1.0: must be 0 or more"),
        ({"reg_data": str(tmp_path / "nowhere")}, "reg_data = .*: no such folder or .zip"),
        ({"reg_data": str(data)}, "reg_data = .*: is the dataset itself"),
    ]:
        with pytest.raises(UserError, match=message) as error:
            TrainConfig(dataset=str(data), **values).validate()
        assert error.value.hint.startswith("fix --")
    TrainConfig(dataset=str(data), masked_loss=True, alpha_mask=True, reg_data=str(tmp_path)).validate()


def test_masked_loss_without_any_mask_is_a_clear_error(tmp_path):
    from sdlora.train import train

    data = draw_dataset(tmp_path / "data", n=2, size=16)
    with pytest.raises(UserError, match="masked_loss is on, but no picture in .* has a mask file") as error:
        train(small_config(data, masked_loss=True), tmp_path / "run", progress_bar=False)
    assert "NAME_mask.png" in error.value.hint and "alpha_mask" in error.value.hint
    assert read_events(tmp_path / "run")[-1]["type"] == "error"


def test_the_app_keeps_uploaded_masks_and_shows_them(tmp_path):
    up = tmp_path / "upload"
    draw_dataset(up, n=2, size=32)
    half_mask((32, 32)).save(up / "img00_mask.png")
    cut = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    cut.paste((0, 0, 0, 0), (0, 0, 32, 10))
    cut.save(up / "cut.png")
    added = ws.add_files(tmp_path / "workspace", "set", [str(p) for p in sorted(up.iterdir())])
    assert sorted(added.saved) == ["cut.png", "img00.png", "img01.png"] and added.rejected == []
    folder = ws.dataset_dir(tmp_path / "workspace", "set")
    assert np.array_equal(np.asarray(Image.open(folder / "img00_mask.png")), np.asarray(half_mask((32, 32))))
    assert np.array_equal(np.asarray(Image.open(folder / "cut_mask.png")), np.asarray(cut.getchannel("A")))
    assert [file for file, _, _ in ws.captions(tmp_path / "workspace", "set")] == ["cut.png", "img00.png",
                                                                                 "img01.png"]
    ctx = SimpleNamespace(root=tmp_path / "workspace")  # what the Pictures tab's handlers read
    shown = [tab_pictures.pick_picture(ctx, {"name": "set", "index": i})["mask"] for i in range(3)]
    assert shown == [str(folder / "cut_mask.png"), str(folder / "img00_mask.png"), None]
    assert {r.name for r in ds.ingest(folder).records if r.mask is not None} == {"cut.png", "img00.png"}
    tab_pictures.remove_picture(ctx, {"name": "set", "file": "img00.png"})
    assert not (folder / "img00_mask.png").exists()


# ---------------------------------------------------------------- one short run

@pytest.mark.slow
def test_a_run_with_masks_and_reg_pictures_records_them(tmp_path):
    from sdlora.train import train

    data = draw_dataset(tmp_path / "data", n=4)
    half_mask((96, 96)).save(data / "img00_mask.png")
    reg = draw_dataset(tmp_path / "reg" / "2_shape", n=3, seed=4).parent
    run = tmp_path / "run"
    train(small_config(data, steps=4, masked_loss=True, reg_data=str(reg), prior_loss_weight=0.5, sample_every=100,
                       save_every=100, sample_steps=1, sample_prompts=["zxq"]), run, progress_bar=False)
    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    assert (start["masked_images"], start["reg_images"], start["reg_samples_per_epoch"]) == (1, 3, 4)
    assert events[-1]["type"] == "done"
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "progress")
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_masked_loss"] == "True" and meta["ss_prior_loss_weight"] == "0.5"
    assert meta["ss_num_reg_images"] == "6"  # 3 pictures x 2 repeats, as kohya counts them
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"2_shape": {"n_repeats": 2, "img_count": 3}}
