"""SD3.5 bases: a small SD3 model (MMDiT-X transformer, 16-channel VAE, two CLIPs and a T5) as a diffusers folder and
as an original-layout single file, trained through the CLI with flow matching and read back by diffusers' own loader;
family detection, the objective, and LoRAs refused across families."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import (assert_app_lists, assert_resume_matches_an_uninterrupted_run, assert_run_verified_and_measured,
                      assert_trains_on_an_fp8_base, draw_dataset, render_sample)
from sdlora import families
from sdlora.errors import UserError
from sdlora.families.naming import mmdit_original, mmdit_original_modules, original_layout
from sdlora.models import CONFIGS_DIR, inspect_checkpoint, load_base
from sdlora.rundir import read_events


def build_sd3():
    """A small random-init SD3.5-Medium-like pipeline: a 2-block MMDiT-X transformer (block 0 with the second image
    attention, qk RMS norms), a 16-channel VAE that shifts and scales its latents, CLIP-L- and CLIP-G-like encoders with
    projections (32 and 48 wide), and a T5 encoder 96 wide. The CLIP tokenizers are the ones shipped for SDXL (SD3.5
    uses the same two); the T5 slot takes the CLIP one too (the pipeline pads it to 256 tokens as T5's), since T5's
    sentencepiece model is not shipped."""
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
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIGS_DIR / "sdxl" / "tokenizer"))  # SD3.5's are SDXL's
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip(48, "gelu"),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(CONFIGS_DIR / "sdxl" / "tokenizer_2")),
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
    """A run folder: three steps through the CLI on the folder, the CLIP text-encoder LoRAs on, cosmap loss weights
    and a min-SNR gamma set (which flow matching does not use)."""
    from sdlora.cli import main

    data = draw_dataset(tmp_path_factory.mktemp("sd3data") / "shapes", n=4, size=80)
    run = tmp_path_factory.mktemp("sd3runs") / "run"
    assert main(["train", str(data), "--base", str(sd3_model[0]), "--out", str(run), "--train-text-encoder",
                 "--flow-loss-weighting", "cosmap", "--min-snr-gamma", "3", *TRAIN]) == 0
    return run


def test_sd3_folder_and_single_file_load_the_same_model_offline(sd3_model, offline):
    folder, single = sd3_model
    from_folder, from_file = load_base(str(folder)), load_base(str(single), base_config=str(folder))
    assert from_folder.family == from_file.family == "sd3.5-medium" and from_file.resolution == 1024
    assert type(from_file.pipe).__name__ == "StableDiffusion3Pipeline"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(from_file.pipe, name).state_dict(), getattr(from_folder.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert not getattr(from_file.pipe, name).training, name  # T5's dropout would change every encoding
    info = inspect_checkpoint(single)
    assert info.arch == "sd3.5-medium" and info.prediction_type is None
    # without --base-config the shipped config lacks T5's tokenizer: one line that says what to pass
    with pytest.raises(UserError, match=r"sd3\.safetensors is an SD3\.5 Medium checkpoint, and its T5 tokenizer does "
                                        r"not ship with sdlora") as err:
        load_base(str(single))
    assert "\n" not in str(err.value) and "--base-config" in err.value.hint


def test_sd3_family_is_told_from_folders_files_and_lora_names(sd3_model, tmp_path):
    fam = families.get("sd3.5-medium")
    pipe = load_base(str(sd3_model[0])).pipe
    assert families.detect(pipe) is fam and families.detect_folder({"transformer": ["diffusers",
                                                                                  "SD3Transformer2DModel"]}).group == "SD3"
    assert families.detect_denoiser({"joint_attention_dim": 4096, "qk_norm": "rms_norm",
                                     "dual_attention_layers": []}).name == "sd3.5-large"
    mmdit = "model.diffusion_model.joint_blocks.0."
    for keys, name in (({mmdit + "x_block.attn.ln_q.weight": (8,)}, "sd3.5-large"),
                       ({mmdit + "x_block.attn.ln_q.weight": (8,), mmdit + "x_block.attn2.qkv.weight": (24, 8)},
                        "sd3.5-medium"),
                       ({mmdit + "x_block.attn.qkv.weight": (24, 8)}, "sd3.5-medium")):  # SD3 Medium (no qk norm)
        save_file({k: torch.zeros(v) for k, v in keys.items()}, str(tmp_path / "m.safetensors"))
        assert inspect_checkpoint(tmp_path / "m.safetensors").arch == name
    # kohya's modelspec strings and the v3.5 spelling both read back
    assert families.stated({"modelspec.architecture": "stable-diffusion-3-5-large/lora"}).name == "sd3.5-large"
    assert families.stated({"modelspec.architecture": "stable-diffusion-v3.5-medium/lora"}) is fam
    assert families.from_lora_names(["transformer.transformer_blocks.0.attn.to_q"]).group == "SD3"
    assert families.from_lora_names(["lora_unet_joint_blocks_0_x_block_attn_qkv"]).group == "SD3"
    # the app lists the folder and the single file, and takes SD3.5's 1024 as their resolution
    assert_app_lists(tmp_path, sd3_model[0], sd3_model[1], 1024, ("SD3.5 Medium", "SD3.5 Medium"))
    # the samples' scheduler: a DDPM-schedule sampler cannot draw a flow model
    assert fam.sampler("EulerDiscreteScheduler") == "FlowMatchEulerDiscreteScheduler"
    assert families.get("sdxl").sampler("EulerDiscreteScheduler") == "EulerDiscreteScheduler"


def test_sd3_text_encoding_is_the_pipelines(sd3_model):
    from sdlora.batches import token_ids

    fam, pipe = families.get("sd3.5-medium"), load_base(str(sd3_model[0])).pipe
    prompts = ["a red square", "zxq, a blue circle"]
    ids = [token_ids(t, prompts, torch.device("cpu"), n) for t, n in zip(fam.tokenizers(pipe), fam.token_lengths)]
    with torch.no_grad():
        hidden, pooled = fam.encode(fam.encoders(pipe), ids)
        ref_hidden, ref_pooled = fam.encode_prompt(pipe, prompts, "cpu")
    assert hidden.shape == (2, 77 + 256, 96) and pooled.shape == (2, 64)
    assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)


def test_t5_is_encoded_once_when_the_clips_train(sd3_model, tmp_path):
    """With the CLIP LoRAs training, T5 (frozen, 4.7B parameters at full size) still encodes each caption once, before
    the pictures, and leaves the device: the step reads its cached output and gives the loss T5 run live gives."""
    from accelerate import Accelerator

    from sdlora import dataset as ds
    from sdlora.batches import Batches, batch_at, token_ids
    from sdlora.step import build_step

    from conftest import small_config

    pipe = load_base(str(sd3_model[0])).pipe
    fam = families.detect(pipe)
    data = draw_dataset(tmp_path / "data", n=2, size=64)
    records = ds.ingest(data, trigger="zxq").records
    config = small_config(data, batch_size=2, train_text_encoder=True, resolution=64)
    accelerator = Accelerator(cpu=True)
    step = build_step(accelerator, pipe, config, fam)
    t5 = fam.encoders(pipe)[2]
    calls, forward = [], t5.forward
    t5.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    offloaded = []
    batches = Batches(config, records, [(64, 64)] * 2, pipe, fam, step.objective, accelerator,
                      texts_cached=lambda: offloaded.append(len(calls)))
    assert offloaded == [1] and batches.texts is None  # one call for every caption, then off the device
    inputs = batches.at(0)[0]
    assert inputs["ids_2"].is_floating_point() and inputs["ids_2"].shape == (2, 256, 96)
    cached_loss, cached_grads = step.loss_and_grads(**inputs)
    captions = [caption for _, caption, _, _ in batch_at(0, config, batches.records, batches.samples, batches.bucket_of)]
    live = dict(inputs, ids_2=token_ids(fam.tokenizers(pipe)[2], captions, torch.device("cpu"), 256))
    live_loss, live_grads = step.loss_and_grads(**live)
    assert len(calls) == 2 and torch.equal(cached_loss, live_loss)
    assert all(torch.equal(a, b) for a, b in zip(cached_grads, live_grads))


def test_flow_matching_objective_is_diffusers_sd3_training():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from sdlora.objectives import FlowMatching

    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    drawn = FlowMatching(config).draw((16, 8, 8), gens)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # every timestep is one of the shifted schedule's: sigma x 1000 with sigma = 3s / (1 + 2s)
    assert all(t in reference.timesteps for t in drawn["timesteps"]) and drawn["noise"].shape == (64, 16, 8, 8)
    assert drawn["timesteps"].float().mean() > 500  # logit-normal around s = 0.5, shifted towards noise
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 16, 8, 8, generator=gen), torch.randn(3, 16, 8, 8, generator=gen)
    timesteps = reference.timesteps[torch.tensor([0, 500, 999])]
    sigmas = reference.sigmas[torch.tensor([0, 500, 999])].reshape(-1, 1, 1, 1)
    objective = FlowMatching(config)
    assert torch.allclose(objective.noisy(latents, noise, timesteps), (1 - sigmas) * latents + sigmas * noise)
    assert torch.equal(objective.target(latents, noise, timesteps), noise - latents)
    assert torch.equal(objective.weights(timesteps), torch.ones(3))
    for scheme in ("sigma_sqrt", "cosmap"):
        expected = compute_loss_weighting_for_sd3(scheme, sigmas).flatten()
        assert torch.allclose(FlowMatching(config, weighting=scheme).weights(timesteps), expected)
    # the other schemes draw from their own densities: uniform spreads, mode with a large scale piles up at the ends
    uniform = FlowMatching(config, sampling="uniform").draw((1, 2, 2), gens)["timesteps"]
    assert uniform.min() < 300 and uniform.max() > 900
    with pytest.raises(UserError, match="must be one of logit_normal, mode, uniform"):
        from sdlora.config import TrainConfig

        TrainConfig(dataset="-", flow_timestep_sampling="cosmap").validate()


@pytest.mark.slow
def test_sd3_resume_matches_an_uninterrupted_run(sd3_model, tmp_path):
    assert_resume_matches_an_uninterrupted_run(sd3_model[0], tmp_path)


@pytest.mark.slow
def test_sd3_trains_on_an_fp8_base(sd3_model, tmp_path):
    """SD3.5's transformer stored in fp8 under the LoRA, as for SD and SDXL."""
    assert_trains_on_an_fp8_base(sd3_model[0], tmp_path)


@pytest.mark.slow
def test_sd3_lora_trains_exports_and_reproduces_in_plain_diffusers(sd3_model, sd3_run, tmp_path):
    """Three steps through the CLI: the verify event, the file's keys (diffusers' names, lora_A/lora_B, nothing else)
    and metadata, diffusers' own loader drawing the run's samples again, strength 0 giving back the base, previews."""
    import diffusers
    from PIL import Image

    from sdlora.generate import Previewer

    events, names, meta = assert_run_verified_and_measured(sd3_run, tmp_path, "sd3.5-medium")
    assert any(e["type"] == "warning" and e["message"].startswith("min_snr_gamma: DDPM settings, unused by SD3.5 "
                                                                  "Medium's flow matching") for e in events)
    transformer = {n for n in names if n.startswith("transformer.transformer_blocks.")}
    assert {n.rsplit(".", 1)[-1] for n in transformer} >= {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                             "add_v_proj", "to_add_out"}
    assert "transformer.transformer_blocks.0.attn2.to_out.0" in transformer  # MMDiT-X's second attention
    te = names - transformer
    assert te and all(n.startswith(("text_encoder.text_model.encoder.layers.",
                                     "text_encoder_2.text_model.encoder.layers.")) for n in te)
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == \
        ("stable-diffusion-3-5-medium/lora", "sd3.5_medium")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["sdlora_alpha_in_weights"]) == ("4", "2.0", "True")

    folder = str(sd3_model[0])
    samples = [e for e in events if e["type"] == "sample" and e["step"] == 3]
    assert samples and all(e["scheduler"] == "FlowMatchEulerDiscreteScheduler" for e in samples)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base_images = [render_sample(pipe, e) for e in samples]
    pipe.load_lora_weights(str(sd3_run / "lora.safetensors"), adapter_name="run")
    for event, base_image in zip(samples, base_images):
        sample = np.asarray(Image.open(event["path"]), dtype=np.float32)
        assert np.abs(render_sample(pipe, event) - sample).mean() < 1.0  # < 1/255 of the range
        assert np.abs(base_image - sample).mean() > 1.0  # the LoRA changed the image
    pipe.set_adapters(["run"], adapter_weights=[0.0])
    assert np.array_equal(render_sample(pipe, samples[0]), base_images[0])

    prev = Previewer(folder, device="cpu")
    kw = dict(steps=3, width=64, height=64, seed=samples[0]["seed"])
    prev.set_loras([(str(sd3_run / "lora.safetensors"), 1.0)])
    one = np.asarray(prev.image(samples[0]["prompt"], **kw), dtype=np.float32)
    assert np.abs(one - np.asarray(Image.open(samples[0]["path"]), dtype=np.float32)).mean() < 1.0
    prev.set_loras([(str(sd3_run / "lora.safetensors"), 0.0)])
    assert np.array_equal(np.asarray(prev.image(samples[0]["prompt"], **kw), dtype=np.float32), base_images[0])


@pytest.mark.slow
def test_sd3_loras_and_other_families_refuse_each_other_by_name(sd3_model, sd3_run, tmp_path):
    from sdlora.cli import main
    from sdlora.lora import check_lora_fits, read_lora

    tiny = load_base("tiny")
    state, meta = read_lora(sd3_run / "lora.safetensors")
    with pytest.raises(UserError, match=r"is a LoRA for SD3\.5 Medium, and the base model is SD1\.x") as err:
        check_lora_fits("sd3.safetensors", state, meta, tiny)
    assert "\n" not in str(err.value) and err.value.hint
    with pytest.raises(UserError, match=r"is a LoRA for SD3, and the base model is SD1\.x"):  # no metadata: the names
        check_lora_fits("bare.safetensors", state, {}, tiny)
    sd3 = load_base(str(sd3_model[0]))
    with pytest.raises(UserError, match=r"is a LoRA for SDXL, and the base model is SD3\.5 Medium"):
        check_lora_fits("xl.safetensors", {}, {"ss_base_model_version": "sdxl_base_v1-0"}, sd3)
    with pytest.raises(UserError, match=r"is a LoRA for SD3\.5 Large, and the base model is SD3\.5 Medium"):
        check_lora_fits("l.safetensors", {}, {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}, sd3)
    # DDPM settings that would change what an SD3.5 run means are refused before any work
    data = draw_dataset(tmp_path / "data", n=2, size=64)
    assert main(["train", str(data), "--base", str(sd3_model[0]), "--out", str(tmp_path / "run"),
                 "--prediction-type", "v_prediction", *TRAIN]) == 2
    error = next(e for e in read_events(tmp_path / "run") if e["type"] == "error")
    assert "is trained by flow matching" in error["message"]
    assert main(["train", str(data), "--base", str(sd3_model[0]), "--out", str(tmp_path / "dora"), "--adapter", "dora",
                 *TRAIN]) == 2
    error = next(e for e in read_events(tmp_path / "dora") if e["type"] == "error")
    assert error["message"] == "adapter = dora: SD3.5 Medium LoRA files are in diffusers' layout, which holds plain " \
                               "LoRA only" and error["hint"] == "use --adapter lora for SD3.5 Medium"


def test_shipped_sd35_configs_are_the_published_architectures():
    """sdlora/configs/sd3.5-medium and -large build SD3.5 Medium and Large at their published sizes (MMDiT 2.5B and
    8.1B, CLIP-L 124M, CLIP-G 695M, T5-XXL encoder 4.76B), with the VAE's shift and scale."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def billions(model):  # what the files hold: parameters and buffers (the MMDiT's position table is one)
        return round(sum(t.numel() for t in model.state_dict().values()) / 1e9, 2)

    for arch, size in (("sd3.5-medium", 2.47), ("sd3.5-large", 8.15)):
        folder = str(CONFIGS_DIR / arch)
        with init_empty_weights(include_buffers=True):
            transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder,
                                                                                             subfolder="transformer"))
            assert billions(transformer) == size, arch
            assert families.detect_denoiser(transformer.config).name == arch
        vae = AutoencoderKL.load_config(folder, subfolder="vae")
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    with init_empty_weights(include_buffers=True):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        t5 = T5EncoderModel(T5Config.from_pretrained(folder, subfolder="text_encoder_3"))
    assert [round(sum(p.numel() for p in m.parameters()) / 1e9, 2) for m in (clip_l, clip_g, t5)] == [0.12, 0.69, 4.76]


@pytest.mark.slow
def test_sd3_lora_merges_resizes_and_reads(sd3_model, sd3_run, tmp_path):
    """merge writes an original-layout SD3 file equal to diffusers' fused LoRA; resize keeps diffusers' layout;
    info names the layers and the family."""
    import diffusers

    from sdlora.info import describe
    from sdlora.merge import merge
    from sdlora.resize import resize

    folder, lora = str(sd3_model[0]), str(sd3_run / "lora.safetensors")
    info = describe(lora)
    assert (info["family"], info["layout"], info["unet"]["preset"], info["text_encoder"]["preset"]) == \
        ("sd3.5-medium", "diffusers", "attn", "attn")
    merge(load_base(folder), [(lora, 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    merged = load_base(str(tmp_path / "merged.safetensors"), base_config=folder).pipe
    fused = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    fused.load_lora_weights(lora)
    fused.fuse_lora()
    a = merged.transformer.state_dict()
    b = {k.replace(".base_layer", ""): v for k, v in fused.transformer.state_dict().items() if "lora_" not in k}
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    resize(lora, tmp_path / "small.safetensors", rank=2)
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys) and len(keys) == 70
    small = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    small.load_lora_weights(str(tmp_path / "small.safetensors"))


def test_kohya_sd3_loras_load_as_diffusers_merges_them_into_the_original_layers(sd3_model, tmp_path):
    """A LoRA in kohya's SD3 layout (fused qkv, `lora_te1_`) previews and merges like the original-layout weights it
    changes: the same deltas added to a single file's fused layers, read by diffusers' own single-file converter,
    give the transformer and CLIP-L that the converted LoRA fused into the folder's model gives, and that merge
    bakes."""
    from sdlora.generate import Previewer
    from sdlora.lora import save_lora

    folder, single = sd3_model
    gen = torch.Generator().manual_seed(0)
    with safe_open(str(single), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    lora, r, alpha = {}, 2, 1.0
    # fused qkv and proj, the text stream's, the last block's (swapped) modulation, the final layer, CLIP-L's q_proj
    for module in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
                   "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.1.context_block.adaLN_modulation.1",
                   "final_layer.adaLN_modulation.1", "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
                                                     "self_attn.q_proj"):
        weight = original[("" if module.startswith("text_") else "model.diffusion_model.") + module + ".weight"]
        down, up = torch.randn(r, weight.shape[1], generator=gen), torch.randn(weight.shape[0], r, generator=gen)
        name = ("lora_te1_" + module.split("transformer.", 1)[1] if module.startswith("text_")
                else "lora_unet_" + module).replace(".", "_")
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                     f"{name}.alpha": torch.tensor(alpha)})
        weight += alpha / r * up @ down
    save_file(original, str(tmp_path / "changed.safetensors"))
    save_lora(tmp_path / "kohya.safetensors", lora, {"modelspec.architecture": "stable-diffusion-3-5-medium/lora"})

    expected = load_base(str(tmp_path / "changed.safetensors"), base_config=str(folder)).pipe
    prev = Previewer(str(folder), device="cpu")
    prev.set_loras([(str(tmp_path / "kohya.safetensors"), 1.0)])
    prev.pipe.fuse_lora(components=["transformer", "text_encoder"])
    for component in ("transformer", "text_encoder"):
        got = {k.replace(".base_layer", ""): v for k, v in getattr(prev.pipe, component).state_dict().items()
               if "lora_" not in k}
        want = getattr(expected, component).state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5, component
    # merge bakes the same file into the same weights
    from sdlora.merge import merge

    base = load_base(str(folder))
    merge(base, [(str(tmp_path / "kohya.safetensors"), 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    for component in ("transformer", "text_encoder"):
        got, want = getattr(base.pipe, component).state_dict(), getattr(expected, component).state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5, component
    # a T5 LoRA is not read: said by name
    save_lora(tmp_path / "t5.safetensors", {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight":
                                            torch.zeros(2, 96), "lora_te3_encoder_block_0_layer_0_SelfAttention_q."
                                                                "lora_up.weight": torch.zeros(16, 2)}, {})
    with pytest.raises(UserError, match="2 keys of this kohya-layout LoRA fit no SD3.5 Medium layer, e.g. lora_te3_"):
        prev.set_loras([(str(tmp_path / "t5.safetensors"), 1.0)])


def test_sd3_attn_mlp_adapts_the_layers_kohya_trains_name_for_name(sd3_model):
    """attn-mlp puts an adapter on every linear layer of the MMDiT blocks and nothing else, the set kohya's sd-scripts
    trains by default (networks/lora_sd3.py), read here off the original layout of the same transformer."""
    from diffusers import SD3Transformer2DModel

    from sdlora.adapters.lora import LORA

    transformer = SD3Transformer2DModel.from_pretrained(str(sd3_model[0]), subfolder="transformer")
    original = mmdit_original(transformer.state_dict(), transformer.config)
    kohya = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k, v in original.items()
             if k.startswith("joint_blocks.") and k.endswith(".weight") and v.dim() == 2}
    family = families.get("sd3.5-medium")
    LORA.attach(transformer, family.unet_targets["attn-mlp"], rank=2, alpha=2.0, exclude=family.unet_exclude)
    to_original = mmdit_original_modules(transformer.config)
    ours = {"lora_unet_" + to_original[name].replace(".", "_") for name in LORA.layers(transformer)}
    assert ours == kohya
