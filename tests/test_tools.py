"""Adapter tools on the tiny model: merge into a checkpoint, stack and hot-swap, resize, info."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.tiny import MODEL_DIR
from test_train import _hand_written_kohya, _plain_pipeline

PROMPT = "zxq, a red circle"


def _image(pipe, seed=0):
    """One 64x64 image in float 0-255, the model's own sampler, 6 steps, as every comparison here renders it."""
    return np.asarray(pipe(PROMPT, num_inference_steps=6, guidance_scale=7.0, height=64, width=64,
                           generator=torch.Generator("cpu").manual_seed(seed)).images[0], dtype=np.float32)


def _preview(prev, loras, seed=0):
    prev.set_loras(loras)
    return _image(prev.pipe, seed)


@torch.no_grad()
def _prediction(prev, loras):
    """The UNet's noise prediction for PROMPT on fixed noisy latents (t = 500) with `loras` loaded by diffusers: a
    LoRA's effect that moves smoothly with its weights, where 6 sampling steps can tip a picture into another one."""
    prev.set_loras(loras)
    pipe = prev.pipe
    hidden = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe.unet(latents, 500, encoder_hidden_states=hidden).sample.numpy()


@pytest.fixture(scope="module")
def loras(trained_run, tmp_path_factory):
    """Our own trained file (rank 4, alpha 2, UNet + text encoder) and a kohya file another trainer wrote."""
    folder = tmp_path_factory.mktemp("loras")
    return str(trained_run / "lora.safetensors"), str(_hand_written_kohya(folder / "other.safetensors"))


@pytest.fixture(scope="module")
def previewer():
    from sdlora.generate import Previewer

    return Previewer("tiny", device="cpu")


def _sum_lora(path, parts):
    """One kohya file equal to sum(s * file) for [(file, s), ...]: ranks concatenated, each scale folded into up."""
    from sdlora.info import read_adapter

    downs, ups = {}, {}
    for file, s in parts:
        for name, (down, up, alpha) in read_adapter(file).modules.items():
            downs.setdefault(name, []).append(down)
            ups.setdefault(name, []).append(up * (s * alpha / down.shape[0]))
    state = {}
    for name in downs:
        down, up = torch.cat(downs[name]), torch.cat(ups[name], dim=1)
        # one alpha (1) for every module: diffusers 0.42 applies the most common alpha to all when they differ
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * down.shape[0],
                      f"{name}.alpha": torch.tensor(1.0)})
    save_file(state, str(path))
    return str(path)


@pytest.mark.slow
def test_stack_at_half_equals_one_merged_lora_and_the_merged_checkpoint(loras, previewer, tmp_path):
    """Two LoRAs at 0.5 each in the previewer = one LoRA holding their sum = both baked into a single file."""
    from diffusers import StableDiffusionPipeline

    a, b = loras
    stacked = _preview(previewer, [(a, 0.5), (b, 0.5)])
    summed = _preview(previewer, [(_sum_lora(tmp_path / "sum.safetensors", [(a, 0.5), (b, 0.5)]), 1.0)])
    base = _preview(previewer, [])
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "tiny", f"{a}:0.5", f"{b}:0.5", "--out", str(out), "--precision", "fp32"]) == 0
    single = StableDiffusionPipeline.from_single_file(str(out), config=MODEL_DIR, safety_checker=None,
                                                      requires_safety_checker=False)
    single.set_progress_bar_config(disable=True)
    merged = _image(single)
    print(f"\nstack vs sum-LoRA {np.abs(stacked - summed).mean():.4f}, stack vs merged {np.abs(stacked - merged).mean():.4f}, "
          f"effect {np.abs(stacked - base).mean():.2f} (0-255)")
    assert np.abs(stacked - summed).mean() < 1.0 and np.abs(stacked - merged).mean() < 1.0  # < 1/255
    assert np.abs(stacked - base).mean() > 2.0  # the LoRAs really act

    # the file is in the original layout: the names AUTOMATIC1111 and ComfyUI look up, the VAE attention as 1x1 convs
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"):
        assert key in keys, key
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert json.loads(meta["sdlora_merged"])["loras"] == [["lora.safetensors", 0.5], ["other.safetensors", 0.5]]

    # the CLI stacks the same way: `generate --lora A:0.5 --lora B:0.5` draws what the previewer draws
    png = tmp_path / "stack.png"
    assert main(["generate", PROMPT, "--lora", f"{a}:0.5", "--lora", f"{b}:0.5", "--steps", "3", "--out", str(png)]) == 0
    previewer.set_loras([(a, 0.5), (b, 0.5)])
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(previewer.image(PROMPT, seed=0, steps=3)))


@pytest.mark.slow
def test_merge_both_formats_equal_base_plus_loras(loras, previewer, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdlora.info import read_adapter
    from sdlora.merge import merge

    a, b = loras
    strengths = [(a, 0.8), (b, -0.4)]
    merge("tiny", strengths, tmp_path / "m.safetensors", precision="fp32")
    report = merge("tiny", strengths, tmp_path / "folder", fmt="diffusers", precision="fp32")
    assert report["loras"][0]["modules"] == 72 and report["loras"][1]["modules"] == 33
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "m.safetensors"), config=MODEL_DIR,
                                                      safety_checker=None, requires_safety_checker=False)
    folder = StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder"))
    # the single file holds every weight of the diffusers folder, bit for bit, under the original names
    for part in ("unet", "vae", "text_encoder"):
        x, y = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    # W' = W + s * alpha/r * up @ down, on one module both files touch
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    expected = _plain_pipeline().unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    for file, s in strengths:
        down, up, alpha = read_adapter(file).modules[name]
        expected += s * alpha / down.shape[0] * up @ down
    got = folder.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.allclose(got, expected, atol=1e-6)

    reference = _preview(previewer, strengths, seed=1)
    for label, pipe in (("single file", single), ("diffusers folder", folder)):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = previewer.pipe.scheduler
        diff = np.abs(_image(pipe, seed=1) - reference).mean()
        print(f"\n{label} (fp32) vs base+LoRAs: {diff:.4f} (0-255)", end="")
        assert diff < 1.0, diff  # < 1/255 of the range

    merge("tiny", strengths, tmp_path / "half.safetensors")  # the default: fp16 on disk
    half = StableDiffusionPipeline.from_single_file(str(tmp_path / "half.safetensors"), config=MODEL_DIR,
                                                    torch_dtype=torch.float32, safety_checker=None,
                                                    requires_safety_checker=False)
    half.set_progress_bar_config(disable=True)
    half.scheduler = previewer.pipe.scheduler
    print(f"\nfp16 merged vs base+LoRAs: {np.abs(_image(half, seed=1) - reference).mean():.4f} (0-255)")
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size


def test_merge_refuses_another_family_and_foreign_keys(loras, tmp_path, capsys):
    a, b = loras
    state, meta = load_file(a), dict(safe_open(a, "pt").metadata())
    xl = tmp_path / "xl.safetensors"
    save_file(state, str(xl), metadata={**meta, "ss_base_model_version": "sdxl_base_v1-0",
                                        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    assert main(["merge", "tiny", f"{a}:1", f"{xl}:0.5", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "xl.safetensors is a LoRA for SDXL" in err and "base model is SD1" in err and "hint:" in err
    assert not (tmp_path / "x.safetensors").exists()

    wrong = load_file(b)
    wrong["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight"] = torch.zeros(2, 64)
    wrong["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_up.weight"] = torch.zeros(64, 2)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match="1 of the 34 entries in wrong.safetensors do not map .*attn1_to_z"):
        from sdlora.merge import merge

        merge("tiny", [(str(tmp_path / "wrong.safetensors"), 1.0)], tmp_path / "y.safetensors")


def test_hot_swap_reweights_without_reloading_the_base(loras, previewer):
    """Switching LoRAs and strengths keeps the loaded base (same modules, same weights); timings are printed."""
    from sdlora.generate import Previewer

    a, b = loras
    t = time.perf_counter()
    Previewer("tiny", device="cpu")
    full_load = time.perf_counter() - t
    unet = previewer.pipe.unet
    before = unet.conv_in.weight.detach().clone()
    base = _preview(previewer, [(a, 0.0), (b, 0.0)])
    loaded = dict(previewer._loaded)
    times = []
    for loras_now in ([(a, 1.0)], [(a, 0.3), (b, 0.7)], [(b, 1.0)], [(a, 0.0), (b, 0.0)]):
        t = time.perf_counter()
        previewer.set_loras(loras_now)
        times.append(time.perf_counter() - t)
    assert previewer.pipe.unet is unet and torch.equal(unet.conv_in.weight, before)
    assert previewer._loaded == loaded  # each file loaded once, then only re-weighted
    assert np.array_equal(_image(previewer.pipe), base)  # strength 0 after all that: the base again
    print(f"\ntiny model: full load {full_load * 1000:.0f} ms; swaps " + ", ".join(f"{x * 1000:.1f} ms" for x in times))


def _module_deltas(path):
    from sdlora.info import read_adapter

    return {n: (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
            for n, (down, up, alpha) in read_adapter(path).modules.items()}


def test_resize_fixed_rank_same_rank_and_energy(loras, previewer, tmp_path, capsys):
    a, _ = loras
    original = _module_deltas(a)
    base, full = _prediction(previewer, []), _prediction(previewer, [(a, 1.0)])
    effect = np.abs(full - base).mean()

    assert main(["resize", a, "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "relative error mean" in printed and "rank   4 -> 2" in printed
    with safe_open(str(tmp_path / "r2.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        downs = {f.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")}
    assert keys == {k for k in load_file(a)}  # same modules, kohya layout, nothing stray
    assert downs == {2} and alphas == {1.0}  # alpha 2 at rank 4 -> 1 at rank 2: alpha/rank stays 0.5
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0" and meta["modelspec.trigger_phrase"] == "zxq"
    resized = _module_deltas(tmp_path / "r2.safetensors")
    from sdlora.resize import format_rows, resize

    rows = {r["name"]: r for r in resize(a, tmp_path / "again.safetensors", rank=2)}
    print("\nrank 2: " + format_rows(list(rows.values()), limit=1).splitlines()[-1])
    for name, delta in original.items():  # the reported error is the error of the update alpha/r * up @ down
        assert rows[name]["rel_error"] == pytest.approx(float((resized[name] - delta).norm() / delta.norm()), abs=1e-4)
    r2 = _prediction(previewer, [(str(tmp_path / "r2.safetensors"), 1.0)])

    resize(a, tmp_path / "r4.safetensors", rank=4)  # same rank: the same function
    same = _module_deltas(tmp_path / "r4.safetensors")
    assert max(float((same[n] - d).abs().max() / d.abs().max()) for n, d in original.items()) < 1e-5
    r4 = _prediction(previewer, [(str(tmp_path / "r4.safetensors"), 1.0)])

    rows = resize(a, tmp_path / "e.safetensors", energy=0.9)  # per-module ranks
    print("energy 0.9: " + format_rows(rows, limit=1).splitlines()[-1])
    ranks = {r["new_rank"] for r in rows}
    assert len(ranks) > 1 and max(r["rel_error"] for r in rows) <= 0.1 ** 0.5 + 1e-6  # energy 0.9: error <= sqrt(0.1)
    meta = safe_open(str(tmp_path / "e.safetensors"), "pt").metadata()
    assert meta["ss_network_dim"] == "Dynamic" and "sshs_model_hash" not in meta
    energy = _module_deltas(tmp_path / "e.safetensors")
    for r in rows:
        delta = original[r["name"]]
        assert float((energy[r["name"]] - delta).norm() / delta.norm()) == pytest.approx(r["rel_error"], abs=1e-4)
    e9 = _prediction(previewer, [(str(tmp_path / "e.safetensors"), 1.0)])  # diffusers sees the per-module ranks right

    diffs = {k: np.abs(v - full).mean() for k, v in (("rank 2", r2), ("rank 4", r4), ("energy 0.9", e9))}
    print(f"\nLoRA effect {effect:.4f}; resized vs original prediction: "
          + ", ".join(f"{k} {v:.4f}" for k, v in diffs.items()))
    assert diffs["rank 4"] < 1e-3 * effect and diffs["rank 2"] < 0.25 * effect and diffs["energy 0.9"] < 0.25 * effect


def test_info_on_our_file_and_a_hand_written_one(loras, tmp_path, capsys):
    from sdlora.info import describe

    a, b = loras
    info = describe(a, base="tiny")
    assert info["family"] == "sd1" and info["family_source"] == "metadata" and info["layout"] == "kohya"
    assert info["ranks"] == {4: 72} and info["alphas"] == {2.0: 72} and info["scales"] == [0.5]
    assert info["unet"]["preset"] == "attn" and info["unet"]["layers"]["to_out.0"] == 14
    assert info["text_encoder"]["modules"] == 16 and info["trigger"] == "zxq"
    assert info["settings"]["steps"] == "20" and info["settings"]["unet lr"] == "0.001"
    assert info["base"]["ok"] and info["base"]["mapped"] == 72

    # the same adapter in the diffusers/peft layout, as diffusers' own writer saves it, reads back the same
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from sdlora.info import read_adapter

    pipe = _plain_pipeline()
    pipe.load_lora_weights(a, adapter_name="x")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), weight_name="peft.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="x"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="x"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["x"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["x"].to_dict())
    kohya, peft = read_adapter(a), read_adapter(tmp_path / "peft.safetensors")
    assert peft.layout == "diffusers" and peft.modules.keys() == kohya.modules.keys() and not peft.stray
    assert all(torch.equal(peft.modules[n][0], d) and torch.equal(peft.modules[n][1], u) and peft.modules[n][2] == al
               for n, (d, u, al) in kohya.modules.items())

    state = load_file(b)
    state["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq.lora_down.weight"] = torch.zeros(2, 192)
    state["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq.lora_up.weight"] = torch.zeros(192, 2)
    state["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"] = torch.zeros(2, 768)  # SD1.5's width
    state["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"] = torch.zeros(768, 2)
    save_file(state, str(tmp_path / "odd.safetensors"))
    assert main(["info", str(tmp_path / "odd.safetensors"), "--base", "tiny"]) == 0
    out = capsys.readouterr().out
    for line in ("family:        unknown", "rank:          2 (35 modules)", "alpha:         1 (33 modules), 2 (2 modules)",
                 "unet:          22 modules: qq x1, to_k x7, to_out.0 x7, to_q x7", "trigger:       (none in the metadata)",
                 "NOT every key maps, 33/35 modules",
                 "no such layer in the base: lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq",
                 "shape mismatch: lora_te_text_model_encoder_layers_0_self_attn_k_proj"):
        assert line in out, (line, out)


def test_original_layout_round_trips_through_diffusers_converters():
    """The single-file writer is the inverse of diffusers' own readers, for SD1.5's and SDXL's block structure
    (small widths, same layout) and both text encoder kinds."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.families.naming import clip_original, openclip_original, original_unet_key, vae_original

    sd15 = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, cross_attention_dim=16, attention_head_dim=2,
                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    sdxl = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=16, attention_head_dim=2,
                norm_num_groups=8, transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True)
    names = {}
    for label, config in (("sd15", sd15), ("sdxl", sdxl)):
        unet = UNet2DConditionModel(**config)
        state = unet.state_dict()
        ldm = {"model.diffusion_model." + original_unet_key(k, unet.config): v for k, v in state.items()}
        assert len(ldm) == len(state)
        back = convert_ldm_unet_checkpoint(ldm, unet.config)
        assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
        names[label] = {k.removeprefix("model.diffusion_model.") for k in ldm}
    # names SD1.5 and SDXL checkpoints use (output_blocks.2.1.conv: SD1.5's first up block has no attention)
    for key in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.2.emb_layers.1.weight", "time_embed.2.bias"):
        assert key in names["sd15"], key
    for key in ("label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                "output_blocks.2.2.conv.weight", "input_blocks.6.0.op.weight"):
        assert key in names["sdxl"], key

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_original(state, 2), vae.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    clip = CLIPTextModel(CLIPTextConfig(**text))
    prefix = "cond_stage_model.transformer."
    back = convert_ldm_clip_checkpoint({prefix + k: v for k, v in clip_original(clip.state_dict()).items()})
    assert {k.removeprefix("text_model."): v for k, v in back.items()}.keys() == clip.state_dict().keys()
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32, hidden_act="gelu"))
    prefix = "conditioner.embedders.1.model."
    back = convert_open_clip_checkpoint(bigg, {prefix + k: v for k, v in openclip_original(bigg.state_dict()).items()}, prefix)
    state = bigg.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_previews_keep_only_the_recently_used_loras_loaded(loras, trained_run, tmp_path):
    """Switching through many LoRA files does not keep them all in memory; one dropped and used again reloads."""
    import shutil

    from sdlora.generate import Previewer

    ours, other = loras
    third = tmp_path / "third.safetensors"
    shutil.copy(ours, third)  # another file: another adapter
    prev = Previewer("tiny", device="cpu")
    prev.keep_loaded = 2
    prev.set_loras([(ours, 1.0)])
    before = np.asarray(prev.image("zxq, a red circle", seed=3, steps=4), dtype=np.float32)
    prev.set_loras([(other, 1.0)])
    prev.set_loras([(str(third), 0.5), (other, 0.5)])
    assert len(prev.pipe.get_list_adapters()["unet"]) == 2  # `ours` was the least recently used: dropped
    prev.set_loras([(ours, 1.0)])  # loaded again, and gives the same image
    after = np.asarray(prev.image("zxq, a red circle", seed=3, steps=4), dtype=np.float32)
    assert np.abs(before - after).max() < 1.0
    assert len(prev.pipe.get_list_adapters()["unet"]) == 2
