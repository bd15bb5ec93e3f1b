"""Loading base models: the embedded tiny model, a diffusers folder, and clear errors for what can't load."""

import shutil

import pytest

from sdlora.errors import UserError
from sdlora.models import load_base
from sdlora.tiny import MODEL_DIR


def test_tiny_is_an_sd1_diffusers_folder():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)  # plain diffusers, no network, fp32 on CPU
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype
    assert str(pipe.unet.dtype) == "torch.float32"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.steps_offset == 1
    base = load_base("tiny")
    assert base.family == "sd1" and base.resolution == 64 and base.prediction_type == "epsilon"


def test_a_diffusers_folder_loads_as_its_family_at_its_own_size(tmp_path):
    from sdlora.check import base_resolution

    folder = tmp_path / "my-model"
    shutil.copytree(MODEL_DIR, folder)
    base = load_base(str(folder))
    # an SD1 folder, trained at the size its configs state (the UNet's sample size times the VAE's scale), not SD1's
    # 512: what the app's plan says before the run
    assert base.family == "sd1" and base.resolution == 64 == base_resolution(str(folder))


def test_training_loads_the_base_in_its_compute_dtype_and_the_vae_in_fp32(tmp_path):
    import torch

    folder = tmp_path / "my-model"
    shutil.copytree(MODEL_DIR, folder)
    full = load_base(str(folder)).pipe
    half = load_base(str(folder), torch.bfloat16, vae_dtype=torch.float32).pipe
    assert half.unet.dtype == half.text_encoder.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    # the same weights as loading in fp32 and casting, as training did before; the VAE's untouched
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(full.unet.parameters(), half.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(full.vae.parameters(), half.vae.parameters()))


@pytest.mark.parametrize("spec,message", [
    ("some-org/not-cached-model", "not in the local model cache"),
    ("/no/such/model.safetensors", "base model file not found"),
    ("/no/such/folder", "base model not found"),
])
def test_models_that_cannot_load_give_one_line_with_a_hint(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message) as err:
        load_base(spec)
    assert err.value.hint and "\n" not in str(err.value)


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        load_base(str(tmp_path))


def test_a_base_loaded_as_stored_then_cast_where_it_trains_is_the_base_loaded_in_that_dtype(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from sdlora.models import stored_dtypes
    from sdlora.step import move

    folder = tmp_path / "my-model"
    shutil.copytree(MODEL_DIR, folder)  # its files hold fp16 weights
    half = torch.float16
    assert stored_dtypes(folder, ["unet", "text_encoder", "text_encoder_2", "vae"]) == \
        {"unet": half, "text_encoder": half, "vae": half}
    stored = load_base(str(folder), torch.bfloat16, vae_dtype=torch.float32, as_stored=True).pipe
    assert stored.unet.dtype == stored.text_encoder.dtype == half and stored.vae.dtype == torch.float32
    for model in (stored.unet, stored.text_encoder):
        move(model, torch.device("cpu"), torch.bfloat16)  # what training does on its device
    direct = load_base(str(folder), torch.bfloat16, vae_dtype=torch.float32).pipe
    for a, b in ((stored.unet, direct.unet), (stored.text_encoder, direct.text_encoder), (stored.vae, direct.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)

    # a file that mixes float dtypes is loaded in the asked dtype, as before: casting it to one stored dtype first
    # would round its wider tensors twice
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[next(iter(state))] = state[next(iter(state))].float()
    save_file(state, weights)
    assert stored_dtypes(folder, ["unet", "text_encoder"]) == {"text_encoder": half}
    assert load_base(str(folder), torch.bfloat16, as_stored=True).pipe.unet.dtype == torch.bfloat16
