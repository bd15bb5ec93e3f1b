"""FLUX.1 bases: a small FLUX model (double- and single-stream transformer, 16-channel VAE, CLIP-L and T5) as a
diffusers folder and as a BFL-layout single file, trained through the CLI with flow matching on packed latents and
read back by diffusers' own loader; dev and schnell told apart, the shipped configs, and LoRAs refused across
families."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import (assert_app_lists, assert_resume_matches_an_uninterrupted_run, assert_run_verified_and_measured,
                      assert_trains_on_an_fp8_base, draw_dataset, render_sample)
from sdlora import families
from sdlora.errors import UserError
from sdlora.families.naming import flux_original, flux_original_modules
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


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory):
    """(dev folder, dev BFL single file, schnell folder, schnell BFL single file) of the small FLUX model, made once.
    The single files hold the transformer alone, as BFL ships FLUX.1."""
    root = tmp_path_factory.mktemp("flux")
    out = []
    for dev in (True, False):
        pipe = build_flux(dev)
        folder = root / ("dev" if dev else "schnell")
        pipe.save_pretrained(str(folder))
        single = root / f"flux1-{folder.name}.safetensors"
        save_file(flux_original(pipe.transformer.state_dict(), pipe.transformer.config), str(single))
        out += [folder, single]
    return tuple(out)


TRAIN = ["--resolution", "64", "--steps", "3", "--batch-size", "2", "--rank", "4", "--alpha", "2", "--trigger", "zxq",
         "--sample-every", "3", "--save-every", "3", "--sample-steps", "3", "--unet-lr", "5e-2",
         "--text-encoder-lr", "1e-2", "--lr-scheduler", "constant", "--warmup-fraction", "0", "--quiet"]


@pytest.fixture(scope="session")
def flux_run(flux_model, tmp_path_factory):
    """A run folder: three steps through the CLI on the dev folder, with CLIP-L's LoRA and the MLPs on, samples at
    the distilled guidance 3.5."""
    from sdlora.cli import main

    data = draw_dataset(tmp_path_factory.mktemp("fluxdata") / "shapes", n=4, size=80)
    run = tmp_path_factory.mktemp("fluxruns") / "run"
    assert main(["train", str(data), "--base", str(flux_model[0]), "--out", str(run), "--train-text-encoder",
                 "--targets", "attn-mlp", "--sample-guidance", "3.5", *TRAIN]) == 0
    return run


def test_flux_folder_and_single_file_load_the_same_model_offline(flux_model, offline):
    for folder, single, name in ((flux_model[0], flux_model[1], "flux.1-dev"),
                                 (flux_model[2], flux_model[3], "flux.1-schnell")):
        from_folder, from_file = load_base(str(folder)), load_base(str(single), base_config=str(folder))
        assert from_folder.family == from_file.family == name and from_file.resolution == 1024
        assert type(from_file.pipe).__name__ == "FluxPipeline"
        a, b = from_file.pipe.transformer.state_dict(), from_folder.pipe.transformer.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert inspect_checkpoint(single).arch == name
    # BFL's names under ComfyUI's model.diffusion_model. load alike; dev's file into a schnell folder's architecture
    # takes the guidance embedder from the file
    with safe_open(str(flux_model[1]), "pt") as f:
        prefixed = {"model.diffusion_model." + k: f.get_tensor(k) for k in f.keys()}
    save_file(prefixed, str(flux_model[1].parent / "comfy.safetensors"))
    from_comfy = load_base(str(flux_model[1].parent / "comfy.safetensors"), base_config=str(flux_model[2]))
    assert from_comfy.family == "flux.1-dev"
    # without --base-config the VAE and text encoders are missing: one line that says what to pass
    with pytest.raises(UserError, match=r"flux1-dev\.safetensors holds the FLUX\.1 dev transformer only; its VAE, "
                                        r"CLIP-L and T5 come from a diffusers FLUX\.1 dev folder") as err:
        load_base(str(flux_model[1]))
    assert "\n" not in str(err.value) and "--base-config" in err.value.hint


def test_flux_family_is_told_from_folders_files_and_lora_names(flux_model, tmp_path):
    dev, schnell = families.get("flux.1-dev"), families.get("flux.1-schnell")
    assert families.detect_folder({"transformer": ["diffusers", "FluxTransformer2DModel"]}).group == "FLUX"
    assert families.detect_denoiser({"joint_attention_dim": 4096, "guidance_embeds": False,
                                     "axes_dims_rope": [16, 56, 56]}) is schnell
    assert families.detect_denoiser({"joint_attention_dim": 4096, "qk_norm": "rms_norm"}).group == "SD3"
    for keys, name in ((["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"], "flux.1-dev"),
                       (["double_blocks.0.img_attn.qkv.weight"], "flux.1-schnell"),
                       (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "flux.1-schnell")):
        save_file({k: torch.zeros(2) for k in keys}, str(tmp_path / "m.safetensors"))
        assert inspect_checkpoint(tmp_path / "m.safetensors").arch == name
    # kohya's metadata: ss_base_model_version `flux1` for both, the architecture tells which
    assert families.stated({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell/lora"}) \
        is schnell
    assert families.stated({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}) is dev
    assert families.stated({"modelspec.architecture": "flux-1-schnell/lora"}) is schnell
    assert families.from_lora_names(["transformer.single_transformer_blocks.0.attn.to_q"]).group == "FLUX"
    assert families.from_lora_names(["lora_unet_double_blocks_0_img_attn_qkv"]).group == "FLUX"
    assert families.from_lora_names(["transformer.transformer_blocks.0.attn2.to_q"]).group == "SD3"
    # the app lists the folders and the single files, and takes FLUX.1's 1024 as their resolution
    assert_app_lists(tmp_path, flux_model[0], flux_model[3], 1024, ("FLUX.1 dev", "FLUX.1 schnell"))
    assert dev.sampler("EulerDiscreteScheduler") == "FlowMatchEulerDiscreteScheduler"
    assert (dev.token_lengths, schnell.token_lengths) == ((0, 512), (0, 256))


def test_flux_text_encoding_and_transformer_call_are_the_pipelines(flux_model):
    """The caption encoding is FluxPipeline.encode_prompt's; `predict` on plain latents is the pipeline's transformer
    call on its packed latents with its ids (and for dev the guidance embedding), unpacked by the pipeline."""
    from diffusers import FluxPipeline

    from sdlora.batches import token_ids
    from sdlora.families import flux

    for folder in (flux_model[0], flux_model[2]):
        pipe = load_base(str(folder)).pipe
        fam = families.detect(pipe)
        prompts = ["a red square", "zxq, a blue circle"]
        ids = [token_ids(t, prompts, torch.device("cpu"), n) for t, n in zip(fam.tokenizers(pipe), fam.token_lengths)]
        with torch.no_grad():
            hidden, pooled = fam.encode(fam.encoders(pipe), ids)
            ref_hidden, ref_pooled = fam.encode_prompt(pipe, prompts, "cpu")
            assert hidden.shape == (2, fam.token_lengths[1], 96) and pooled.shape == (2, 32)
            assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)
            latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
            timesteps = torch.tensor([250.0, 750.0])
            pred = fam.predict(pipe.transformer, latents, timesteps, hidden, pooled, None)
            _, _, text_ids = pipe.encode_prompt(prompts, prompts, device="cpu",
                                                max_sequence_length=fam.token_lengths[1])
            guidance = torch.full((2,), flux.TRAIN_GUIDANCE) if pipe.transformer.config.guidance_embeds else None
            packed = pipe.transformer(hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 8, 6),
                                      timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                                      encoder_hidden_states=hidden, txt_ids=text_ids,
                                      img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
                                      return_dict=False)[0]
            expected = FluxPipeline._unpack_latents(packed, 8 * 8, 8 * 6, 8)
        assert pred.shape == latents.shape and torch.equal(pred, expected)
        # the position ids, made on the device (a CUDA graph cannot capture the pipeline's copy from the CPU)
        assert torch.equal(flux.image_ids(4, 3, "cpu", torch.float32),
                           FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
        # a run's --train-guidance reaches dev's guidance embedding; schnell has none to tell
        told = fam.with_train_guidance(4.0)
        with torch.no_grad():
            other = told.predict(pipe.transformer, latents, timesteps, hidden, pooled, None)
        assert told.name == fam.name and torch.equal(other, pred) == (guidance is None)
    # the noise levels are drawn from the unshifted training sigmas of both (dev's scheduler shifts by resolution
    # only to sample)
    from sdlora.config import TrainConfig
    from sdlora.objectives import make

    objective = make(fam, pipe.scheduler.config, TrainConfig(dataset="-"), "cpu")
    assert torch.allclose(objective.scheduler.timesteps, torch.arange(1000, 0, -1).float())


def test_the_flux_step_runs_forward_and_recomputed_blocks_in_its_kernels(flux_model, tmp_path):
    """FLUX.1's attention kernels (a CUDA choice) hold for the whole step: with gradient checkpointing the backward
    recomputes every block, and each attention call, first or recomputed, runs inside the family's step context."""
    import contextlib
    import dataclasses

    from accelerate import Accelerator

    from conftest import small_config
    from sdlora import dataset as ds
    from sdlora.batches import Batches
    from sdlora.step import build_step

    pipe = load_base(str(flux_model[0])).pipe
    inside, calls = [], []

    @contextlib.contextmanager
    def recorded(device):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    fam = dataclasses.replace(families.detect(pipe), step_context=recorded)
    data = draw_dataset(tmp_path / "data", n=2, size=64)
    config = small_config(data, batch_size=2, resolution=64, gradient_checkpointing=True, train_text_encoder=False)
    accelerator = Accelerator(cpu=True)
    step = build_step(accelerator, pipe, config, fam)
    for block in pipe.transformer.transformer_blocks:
        forward = block.attn.forward
        block.attn.forward = lambda *a, _f=forward, **k: (calls.append(bool(inside)), _f(*a, **k))[1]
    batches = Batches(config, ds.ingest(data, trigger="zxq").records, [(64, 64)] * 2, pipe, fam, step.objective,
                      accelerator)
    assert pipe.transformer.is_gradient_checkpointing
    step.loss_and_grads(**batches.at(0)[0])
    double_blocks = len(pipe.transformer.transformer_blocks)
    assert len(calls) == 2 * double_blocks and all(calls)  # each block's forward and its recomputation


def test_shipped_flux_configs_are_the_published_architectures():
    """sdlora/configs/flux.1-dev and -schnell build FLUX.1 at its published size (a 11.9B transformer; schnell without
    the guidance embedder), with the VAE's shift and scale, and each is told as its family."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    for arch, guidance in (("flux.1-dev", True), ("flux.1-schnell", False)):
        folder = str(CONFIGS_DIR / arch)
        with init_empty_weights(include_buffers=True):
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder,
                                                                                               subfolder="transformer"))
        assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 11.9
        assert transformer.config.guidance_embeds is guidance
        assert families.detect_denoiser(transformer.config).name == arch
        vae = AutoencoderKL.load_config(folder, subfolder="vae")
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)


@pytest.mark.slow
def test_flux_resume_matches_an_uninterrupted_run(flux_model, tmp_path):
    assert_resume_matches_an_uninterrupted_run(flux_model[0], tmp_path)


@pytest.mark.slow
def test_flux_trains_on_an_fp8_base(flux_model, tmp_path):
    """FLUX.1's transformer stored in fp8 under the LoRA, as for SD and SDXL."""
    assert_trains_on_an_fp8_base(flux_model[0], tmp_path)


@pytest.mark.slow
def test_flux_lora_trains_exports_and_reproduces_in_plain_diffusers(flux_model, flux_run, tmp_path):
    """Three steps through the CLI: the verify event, the measures, the file's keys (diffusers' names, lora_A/lora_B)
    and metadata, diffusers' own FluxPipeline drawing the run's samples again, strength 0 giving back the base."""
    import diffusers
    from PIL import Image

    events, names, meta = assert_run_verified_and_measured(flux_run, tmp_path, "flux.1-dev")
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
            "transformer.transformer_blocks.0.attn.to_add_out", "transformer.transformer_blocks.0.ff.net.2",
            "transformer.single_transformer_blocks.0.attn.to_v", "transformer.single_transformer_blocks.0.proj_mlp",
            "transformer.single_transformer_blocks.0.proj_out"} <= names
    # attn-mlp adapts the layers kohya's sd-scripts trains by default, name for name: every linear layer inside the
    # double and single blocks (networks/lora_flux.py), read here off the BFL layout of the same transformer
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(str(flux_model[0]), subfolder="transformer")
    original = flux_original(transformer.state_dict(), transformer.config)
    kohya = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k, v in original.items()
             if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.dim() == 2}
    to_original = flux_original_modules(transformer.config)
    ours = {"lora_unet_" + to_original[n[len("transformer."):]].replace(".", "_")
            for n in names if n.startswith("transformer.")}
    assert ours == kohya and "transformer.proj_out" not in names
    te = {n for n in names if not n.startswith("transformer.")}
    assert te and all(n.startswith("text_encoder.text_model.encoder.layers.") for n in te)  # CLIP-L only, never T5
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("flux-1-dev/lora", "flux1")

    samples = [e for e in events if e["type"] == "sample" and e["step"] == 3]
    assert samples and all(e["scheduler"] == "FlowMatchEulerDiscreteScheduler" for e in samples)
    pipe = diffusers.FluxPipeline.from_pretrained(str(flux_model[0]))
    pipe.set_progress_bar_config(disable=True)
    base_images = [render_sample(pipe, e) for e in samples]
    pipe.load_lora_weights(str(flux_run / "lora.safetensors"), adapter_name="run")
    for event, base_image in zip(samples, base_images):
        sample = np.asarray(Image.open(event["path"]), dtype=np.float32)
        assert np.abs(render_sample(pipe, event) - sample).mean() < 1.0  # < 1/255 of the range
        assert np.abs(base_image - sample).mean() > 1.0  # the LoRA changed the image
    pipe.set_adapters(["run"], adapter_weights=[0.0])
    assert np.array_equal(render_sample(pipe, samples[0]), base_images[0])


@pytest.mark.slow
def test_flux_loras_and_other_families_refuse_each_other_by_name(flux_model, flux_run):
    from sdlora.lora import check_lora_fits, read_lora

    state, meta = read_lora(flux_run / "lora.safetensors")
    tiny = load_base("tiny")
    with pytest.raises(UserError, match=r"is a LoRA for FLUX\.1 dev, and the base model is SD1\.x") as err:
        check_lora_fits("flux.safetensors", state, meta, tiny)
    assert "\n" not in str(err.value) and err.value.hint
    schnell = load_base(str(flux_model[2]))
    with pytest.raises(UserError, match=r"is a LoRA for FLUX\.1 dev, and the base model is FLUX\.1 schnell"):
        check_lora_fits("flux.safetensors", state, meta, schnell)
    with pytest.raises(UserError, match=r"is a LoRA for SD3\.5 Medium, and the base model is FLUX\.1 schnell"):
        check_lora_fits("sd3.safetensors", {}, {"modelspec.architecture": "stable-diffusion-3-5-medium/lora"}, schnell)


@pytest.mark.slow
def test_flux_lora_previews_merges_and_reads(flux_model, flux_run, tmp_path):
    """Previews draw the run's sample again at strength 1 and the base at 0; merge writes a BFL-layout transformer
    file equal to diffusers' fused LoRA, which loads back with --base-config; info names the family and layers."""
    import diffusers
    from PIL import Image

    from sdlora.generate import Previewer
    from sdlora.info import describe
    from sdlora.merge import merge

    folder, lora = str(flux_model[0]), str(flux_run / "lora.safetensors")
    sample = next(e for e in read_events(flux_run) if e["type"] == "sample" and e["step"] == 3)
    prev = Previewer(folder, device="cpu")
    kw = dict(steps=sample["steps"], width=64, height=64, seed=sample["seed"], guidance_scale=sample["guidance_scale"])
    prev.set_loras([(lora, 1.0)])
    one = np.asarray(prev.image(sample["prompt"], **kw), dtype=np.float32)
    assert np.abs(one - np.asarray(Image.open(sample["path"]), dtype=np.float32)).mean() < 1.0
    prev.set_loras([(lora, 0.0)])
    zero = np.asarray(prev.image(sample["prompt"], **kw), dtype=np.float32)
    base = diffusers.FluxPipeline.from_pretrained(folder)
    base.set_progress_bar_config(disable=True)
    assert np.array_equal(zero, render_sample(base, sample))

    info = describe(lora)
    assert (info["family"], info["layout"], info["unet"]["preset"]) == ("flux.1-dev", "diffusers", "attn-mlp")
    merge(load_base(folder), [(lora, 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert "single_blocks.0.linear1.weight" in set(f.keys())
    merged = load_base(str(tmp_path / "merged.safetensors"), base_config=folder).pipe
    base.load_lora_weights(lora)
    base.fuse_lora()
    a = merged.transformer.state_dict()
    b = {k.replace(".base_layer", ""): v for k, v in base.transformer.state_dict().items() if "lora_" not in k}
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_kohya_flux_loras_preview_and_merge_as_the_original_layers(flux_model, tmp_path):
    """A LoRA in kohya's FLUX layout (fused qkv, `lora_te1_`) previews and merges like the BFL-layout weights it
    changes: the same deltas added to the single file's fused layers, read by sdlora's loader, give the transformer
    that the LoRA fused into the folder's model gives (diffusers' own kohya conversion), and that merge bakes."""
    from sdlora.generate import Previewer
    from sdlora.lora import save_lora
    from sdlora.merge import merge

    folder, single = flux_model[0], flux_model[1]
    gen = torch.Generator().manual_seed(0)
    with safe_open(str(single), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    lora, r, alpha = {}, 2, 1.0
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear2"):
        weight = original[module + ".weight"]
        down, up = torch.randn(r, weight.shape[1], generator=gen), torch.randn(weight.shape[0], r, generator=gen)
        name = "lora_unet_" + module.replace(".", "_")
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                     f"{name}.alpha": torch.tensor(alpha)})
        weight += alpha / r * up @ down
    q = load_base(str(folder)).pipe.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    te_down, te_up = torch.randn(r, q.shape[1], generator=gen), torch.randn(q.shape[0], r, generator=gen)
    lora.update({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": te_down,
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": te_up,
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(alpha)})
    save_file(original, str(tmp_path / "changed.safetensors"))
    save_lora(tmp_path / "kohya.safetensors", lora, {"modelspec.architecture": "flux-1-dev/lora",
                                                     "ss_base_model_version": "flux1"})
    expected = load_base(str(tmp_path / "changed.safetensors"), base_config=str(folder)).pipe.transformer.state_dict()
    expected_q = q + alpha / r * te_up @ te_down

    prev = Previewer(str(folder), device="cpu")
    prev.set_loras([(str(tmp_path / "kohya.safetensors"), 1.0)])
    prev.pipe.fuse_lora(components=["transformer", "text_encoder"])
    got = {k.replace(".base_layer", ""): v for k, v in prev.pipe.transformer.state_dict().items() if "lora_" not in k}
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
    got_q = prev.pipe.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (got_q - expected_q).abs().max().item() < 1e-5
    base = load_base(str(folder))
    merge(base, [(str(tmp_path / "kohya.safetensors"), 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    got = base.pipe.transformer.state_dict()
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
    got_q = base.pipe.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    assert (got_q - expected_q).abs().max().item() < 1e-5
    # a T5 LoRA is not read: said by name (diffusers' converter would drop it with a warning)
    t5 = {k: v for k, v in lora.items() if k.startswith("lora_unet_double_blocks_0_img_attn_qkv")}
    t5.update({"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 96),
               "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(32, 2)})
    save_lora(tmp_path / "t5.safetensors", t5, {})
    with pytest.raises(UserError, match=r"^this kohya-layout LoRA does not fit FLUX\.1 dev: 2 T5 keys \(lora_te2_\) are "
                                        r"not read"):
        prev.set_loras([(str(tmp_path / "t5.safetensors"), 1.0)])
