"""LoHa, LoKr and DoRA on the convolutions: files in the LyCORIS layout, keys and shapes as LyCORIS writes them, each
module's change as LyCORIS's formulas (written here, with ComfyUI's scale rules) and the lycoris package read it;
short runs that verify, merge as LyCORIS's own network applies the file, preview, describe and refuse to resize."""

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open

from sdlora import adapters
from sdlora.families.targets import UNET_CONV3X3_TARGETS, UNET_CONV_OTHER_TARGETS
from sdlora.lora import kohya_modules, kohya_state_dict, save_lora
from sdlora.models import load_base
from conftest import tiny_latents

CASES = {  # name -> TrainConfig values
    "loha": {"adapter": "loha"},
    "lokr": {"adapter": "lokr"},
    "lokr-factor-16": {"adapter": "lokr", "lokr_factor": 16},  # above sqrt(128): LyCORIS swaps the two sides
    "lokr-full": {"adapter": "lokr", "lokr_full_matrix": True},
    "dora-conv": {"adapter": "dora", "dora_conv": True},
}
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def _config(**values):
    from conftest import small_config

    return small_config("unused", **values)


def _attach(unet, config, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0):
    """The type's layers on the attention and the ResNet blocks, every trained tensor moved off its start."""
    adapter = adapters.for_config(config)
    params = adapter.attach(unet, ATTN + UNET_CONV_OTHER_TARGETS, rank=rank, alpha=alpha,
                            conv_targets=UNET_CONV3X3_TARGETS, conv_rank=conv_rank, conv_alpha=conv_alpha)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    return adapter, params


def lycoris_delta(state: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A module's weight change read from the file's tensors alone, by the formulas LyCORIS trains with and ComfyUI
    (comfy/weight_adapter/) applies: LoHa alpha/r * (w1_a w1_b) * (w2_a w2_b); LoKr kron(w1, w2) at alpha/r when a
    factor is a low-rank product (r its inner size) and 1 when both are full; LoRA alpha/r * up down, and DoRA's
    m * V / |V| per output channel."""
    t = {k[len(name) + 1:]: v.double() for k, v in state.items() if k.startswith(name + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (alpha / r)
    elif any(k.startswith("lokr_") for k in t):
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        w2 = t.get("lokr_w2")
        if w2 is None:
            w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2) * (alpha / dim if dim else 1.0)
    else:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
        diff = up @ down * (alpha / down.shape[0])
    diff = diff.reshape(weight.shape)
    if "dora_scale" in t:
        v = (weight.double() + diff).flatten(1)
        diff = (t["dora_scale"].reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)).reshape(weight.shape) - weight
    return diff.float()


def _output_change(layer, weight_change):
    """(what the trained layer adds to its base's output, what `weight_change` adds) on one random input."""
    base = layer.get_base_layer()
    conv = isinstance(base, torch.nn.Conv2d)
    x = torch.randn((1, base.weight.shape[1], 5, 5) if conv else (3, base.weight.shape[1]),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        wanted = layer(x) - base(x)
        got = torch.nn.functional.conv2d(x, weight_change, stride=base.stride, padding=base.padding) if conv \
            else x @ weight_change.T
    return wanted, got


def _probe(unet):
    g = torch.Generator().manual_seed(0)
    return (tiny_latents(1, g), torch.tensor([500]),
            torch.randn(1, 77, unet.config.cross_attention_dim, generator=g))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_file_is_what_lycoris_writes_and_reads_back_to_the_trained_change(case, tmp_path):
    """Every module's keys and shapes are LyCORIS's; the change the file gives by LyCORIS's formulas is what the
    trained layer adds (fp32, tight), at strength 0 the model is the base; the metadata is LyCORIS's."""
    from lycoris.functional.general import factorization

    config = _config(**CASES[case])
    unet = load_base("tiny").pipe.unet
    x = _probe(unet)
    with torch.no_grad():
        base_out = unet(*x).sample
    adapter, params = _attach(unet, config)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    path = tmp_path / "a.safetensors"
    save_lora(path, kohya_state_dict(unet, {}, adapter=adapter),
              adapter.metadata(rank=4, alpha=2.0, dropout=0.0, conv_rank=2, conv_alpha=3.0))
    state = load_file(str(path))
    trained = kohya_modules(unet, {}, adapter=adapter)
    assert {k.split(".", 1)[0] for k in state} == set(trained)
    assert all(v.dtype == torch.float32 for v in state.values())
    for name, layer in trained.items():
        weight = layer.get_base_layer().weight
        wanted, got = _output_change(layer, lycoris_delta(state, name, weight))
        assert torch.allclose(got, wanted, atol=1e-5, rtol=1e-4), (name, (got - wanted).abs().max())

    suffixes = {k.split(".", 1)[1] for k in state}
    q, conv = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    out_q, in_q = trained[q].get_base_layer().weight.shape
    out_c, in_c, kh, kw = trained[conv].get_base_layer().weight.shape
    if case == "loha":
        assert suffixes == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
        assert state[f"{q}.hada_w1_a"].shape == state[f"{q}.hada_w2_a"].shape == (out_q, 4)
        assert state[f"{q}.hada_w1_b"].shape == (4, in_q)
        assert state[f"{conv}.hada_w1_b"].shape == (2, in_c * kh * kw)  # the kernel flattened, no Tucker factor
        assert float(state[f"{conv}.alpha"]) == 3.0 and float(state[f"{q}.alpha"]) == 2.0
    elif case.startswith("lokr"):
        factor = config.lokr_factor
        (a, b), (c, d) = factorization(out_q, factor), factorization(in_q, factor)
        assert state[f"{q}.lokr_w1"].shape == (a, c)  # the small factor, full
        if case == "lokr-full" or 4 >= max(b, d) / 2:  # as LyCORIS: w2 stays whole where rank 4 would not shrink it
            assert case != "lokr-full" or suffixes == {"lokr_w1", "lokr_w2", "alpha"}
            assert state[f"{q}.lokr_w2"].shape == (b, d)
        else:
            assert state[f"{q}.lokr_w2_a"].shape == (b, 4) and state[f"{q}.lokr_w2_b"].shape == (4, d)
    else:
        assert state[f"{conv}.lora_down.weight"].shape == (2, in_c, kh, kw)
        assert state[f"{conv}.dora_scale"].shape == (out_c, 1, 1, 1)  # per output channel, LyCORIS wd_on_output

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    expected = {"algo": "lora" if case == "dora-conv" else config.adapter, "conv_dim": "2", "conv_alpha": "3.0"}
    assert {k: args[k] for k in expected} == expected
    if config.adapter == "lokr":
        assert args["factor"] == str(config.lokr_factor)
        assert args.get("full_matrix") == ("True" if config.lokr_full_matrix else None)
    with torch.no_grad():
        adapter.set_strength(unet, 0.0)
        assert torch.equal(unet(*x).sample, base_out)

    from sdlora.errors import UserError
    from sdlora.info import describe, format_info
    from sdlora.resize import resize

    info = describe(path)
    assert info["type"] == ("dora" if case == "dora-conv" else config.adapter) and not info["stray_keys"]
    assert info["dora_modules"] == (len(trained) if case == "dora-conv" else 0)
    assert f"type:          {info['type']}" in format_info(info)
    if config.adapter in ("loha", "lokr"):
        with pytest.raises(UserError, match=f"is a LyCORIS {config.adapter} file, which cannot be resized") as e:
            resize(path, tmp_path / "small.safetensors", rank=2)
        assert "merge" in e.value.hint


def test_lycoris_options_are_checked_where_they_are_typed():
    from sdlora.errors import UserError

    for values, field in (({"adapter": "loha", "lora_dropout": 0.1}, "lora_dropout"),
                          ({"adapter": "lokr", "lokr_factor": 0}, "lokr_factor"),
                          ({"adapter": "lokr", "export_diffusers": True}, "export_diffusers"),
                          ({"adapter": "loha", "base_precision": "nf4"}, "base_precision"),
                          ({"adapter": "locon", "dora_conv": True}, "dora_conv"),
                          ({"adapter": "loha", "lokr_full_matrix": True}, "lokr_full_matrix")):
        with pytest.raises(UserError, match=f"^{field} = ") as e:
            _config(**values).validate()
        assert e.value.hint == f"fix --{field.replace('_', '-')}"
    _config(adapter="lokr", lokr_factor=8, lokr_full_matrix=True).validate()


@pytest.mark.parametrize("full_matrix", [False, True])
def test_lokr_applies_the_kronecker_product_to_the_reshaped_input_as_peft_applies_the_formed_one(full_matrix,
                                                                                                  monkeypatch):
    """LoKr's Linear layers and convolutions never form kron(w1, w2): output and every gradient equal peft's
    formed-product path."""
    from sdlora.adapters.lycoris import ADAPTER, LoKr

    torch.manual_seed(0)
    for base, x in ((torch.nn.Linear(128, 128), torch.randn(3, 7, 128)),
                    (torch.nn.Linear(768, 320), torch.randn(3, 7, 768)), (torch.nn.Linear(40, 96), torch.randn(3, 7, 40)),
                    (torch.nn.Conv2d(320, 320, 3, padding=1), torch.randn(2, 320, 8, 8)),
                    (torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.randn(2, 128, 9, 9)),
                    (torch.nn.Conv2d(320, 640, 1), torch.randn(2, 320, 6, 6))):
        model = torch.nn.Sequential(base)
        conv = isinstance(base, torch.nn.Conv2d)
        params = LoKr(full_matrix=full_matrix).attach(model, [] if conv else ["0"], rank=4, alpha=2.0,
                                                      conv_targets=["0"] if conv else [], conv_rank=4, conv_alpha=2.0)
        for p in params:
            p.data.normal_(0, 0.1)  # both factors non-zero (a fresh LoKr adds nothing)
        layer = model[0]
        x.requires_grad_(True)
        with monkeypatch.context() as m:
            m.setattr(torch, "kron", None)  # the product is never formed
            fast = model(x)
        formed = layer.base_layer(x) + type(layer)._get_delta_activations(layer, ADAPTER, x)
        assert not torch.equal(fast, layer.base_layer(x))
        torch.testing.assert_close(fast, formed, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(fast.square().sum(), [x, *params]),
                        torch.autograd.grad(formed.square().sum(), [x, *params])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # fp32 sums


def test_loha_applies_its_factors_to_wide_layers_as_peft_applies_the_formed_change(monkeypatch):
    """LoHa's Linear and conv layers wider than 2 r^2 never form the change: output and every gradient equal peft's
    formed-change path (a narrow layer takes that path itself)."""
    from peft.tuners.loha import layer as peft_loha

    from sdlora.adapters.lycoris import ADAPTER, LoHa

    torch.manual_seed(0)
    for base, x, wide in ((torch.nn.Linear(512, 384), torch.randn(3, 50, 512), True),
                          (torch.nn.Conv2d(320, 320, 3, padding=1), torch.randn(2, 320, 8, 8), True),
                          (torch.nn.Conv2d(320, 640, 1), torch.randn(2, 320, 8, 8), True),
                          (torch.nn.Linear(24, 24), torch.randn(3, 50, 24), False)):
        model = torch.nn.Sequential(base)
        conv = isinstance(base, torch.nn.Conv2d)
        params = LoHa("loha").attach(model, [] if conv else ["0"], rank=4, alpha=2.0,
                                     conv_targets=["0"] if conv else [], conv_rank=4, conv_alpha=2.0)
        for p in params:
            p.data.normal_(0, 0.1)  # all four factors non-zero (a fresh LoHa adds nothing)
        layer = model[0]
        x.requires_grad_(True)
        with monkeypatch.context() as m:
            if wide:
                m.setattr(peft_loha, "make_weight", None)  # the change is never formed
            fast = model(x)
        formed = layer.base_layer(x) + type(layer)._get_delta_activations(layer, ADAPTER, x)
        assert not torch.allclose(fast, layer.base_layer(x), atol=1e-3)
        torch.testing.assert_close(fast, formed, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(fast.square().sum(), [x, *params]),
                        torch.autograd.grad(formed.square().sum(), [x, *params])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["loha", "lokr", "lokr-factor-16", "lokr-full"])
def test_the_lycoris_package_reads_the_file_to_the_trained_change(case, tmp_path):
    """lycoris's own modules, made from the file's tensors (make_module_from_state_dict, as its loader does), give
    each module's weight change the trained layer adds."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    config = _config(**CASES[case])
    unet = load_base("tiny").pipe.unet
    adapter, _ = _attach(unet, config)
    state = kohya_state_dict(unet, {}, adapter=adapter)
    some = ("attn1_to_q", "attn2_to_k", "to_out_0", "conv1", "conv_shortcut", "time_emb_proj", "samplers_0_conv")
    for name, layer in kohya_modules(unet, {}, adapter=adapter).items():
        if not name.endswith(some):
            continue
        t = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        base = layer.get_base_layer()
        with torch.no_grad():
            if case == "loha":  # as lycoris's loader makes them
                module = LohaModule.make_module_from_state_dict(name, base, t["hada_w1_a"], t["hada_w1_b"],
                                                                t["hada_w2_a"], t["hada_w2_b"], None, None, t["alpha"],
                                                                None)
            else:
                # the module lycoris trains at this rank, factor and full_matrix: the file's tensors are its own, shape
                # for shape (lycoris's loader guesses the factor from the shapes, and misses some above sqrt(dim))
                module = LokrModule(name, base, 1.0, layer.r["default"], float(t["alpha"]), factor=config.lokr_factor,
                                    full_matrix=config.lokr_full_matrix)
                own = {k: p for k, p in module.named_parameters() if k.startswith("lokr_")}
                assert {k: p.shape for k, p in own.items()} == {k: v.shape for k, v in t.items() if k != "alpha"}
                for k, p in own.items():
                    p.copy_(t[k])
        # its forward, as lycoris applies a loaded network (lycoris 4.1.3's get_diff_weight scales by alpha/r twice)
        module.multiplier = 1.0
        conv = isinstance(base, torch.nn.Conv2d)
        x = torch.randn((1, base.weight.shape[1], 5, 5) if conv else (3, base.weight.shape[1]),
                        generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            wanted, got = layer(x) - base(x), module(x) - base(x)
        assert torch.allclose(got, wanted, atol=1e-5, rtol=1e-4), (name, (got - wanted).abs().max())


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_sdxl_files_use_sgm_names_and_both_text_encoder_prefixes(kind, tmp_path):
    """On the SDXL-like model the UNet's modules (attention and ResNet layers) carry kohya's original block numbering,
    the text encoders lora_te1_/lora_te2_; info reads the file as SDXL from the names alone."""
    from test_families import build_pipeline
    from sdlora.info import describe

    pipe = build_pipeline("sdxl")
    adapter = adapters.get(kind)
    _attach(pipe.unet, _config(adapter=kind))
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        adapter.attach(te, ["q_proj", "k_proj", "v_proj", "out_proj"], rank=4, alpha=2.0)
    state = kohya_state_dict(pipe.unet, {"lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2},
                             sgm_unet=True, adapter=adapter)
    names = {k.split(".", 1)[0] for k in state}
    first = "hada_w1_a" if kind == "loha" else "lokr_w1"
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
                     "lora_unet_middle_block_0_out_layers_3", "lora_unet_output_blocks_0_0_skip_connection",
                     "lora_unet_input_blocks_3_0_op", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert expected in names and f"{expected}.{first}" in state, expected
    assert not any("down_blocks" in n or "resnets" in n for n in names)
    save_lora(tmp_path / "x.safetensors", state, {})
    info = describe(tmp_path / "x.safetensors")
    assert info["family"] == "sdxl" and info["type"] == kind and info["layout"] == "lycoris"
    assert info["conv3x3_modules"] > 0 and not info["stray_keys"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_a_run_trains_verifies_merges_as_lycoris_applies_it_previews_and_describes(case, tmp_path, dataset_dir):
    """A 4-step run lowers the loss on its pictures; its verify event passes (every key read, strength 0 the base,
    the file against the trained layers); the checkpoint merged at strength 1 equals the base with the file applied
    by lycoris's own modules (unmerged); previews at strength 0 give the base picture and differ at 1;
    info names the type; resize refuses it with a hint."""
    from conftest import small_config
    from lycoris.modules import get_module, make_module
    from sdlora.errors import UserError
    from sdlora.generate import Previewer
    from sdlora.info import describe
    from sdlora.merge import merge
    from sdlora.resize import resize
    from sdlora.rundir import read_events
    from sdlora.train import train
    from test_train import _denoising_loss

    run = tmp_path / case
    # LoKr's full-matrix modules train at scale 1 (LyCORIS's rule), so a lower learning rate
    train(small_config(dataset_dir, steps=4, sample_every=0, save_every=0, train_text_encoder=False,
                       unet_lr={"loha": 1e-2, "lokr": 1e-3}[case], **CASES[case]), run, progress_bar=False)
    events = read_events(run)
    verify = next(e for e in events if e["type"] == "verify")
    assert verify["ok"] and verify["file_check"]["ok"] and verify["file_check"]["modules"] > 0, verify
    assert verify["keys_consumed"] == verify["keys_written"] and verify["strength0_max_diff"] == 0.0
    assert "lycoris" in verify["note"]
    file = run / "lora.safetensors"
    info = describe(file)
    assert info["type"] == case and info["network"] == "lycoris.kohya" and info["conv3x3_modules"] > 0

    prev = Previewer(load_base("tiny"), device="cpu")
    base_image = prev.image("zxq, a red circle", seed=0, steps=2)
    prev.set_loras([(str(file), 0.0)])
    assert prev.image("zxq, a red circle", seed=0, steps=2).tobytes() == base_image.tobytes()
    prev.set_loras([(str(file), 1.0)])
    assert prev.image("zxq, a red circle", seed=0, steps=2).tobytes() != base_image.tobytes()
    prev.set_loras([])  # the base's own weights again

    # unmerged: the file's modules made by lycoris's loader (get_module, make_module) on a fresh base, applied as
    # lycoris applies a network (each wraps its layer's forward)
    base, reference = prev.base, load_base("tiny").pipe.unet
    state = load_file(str(file))
    table = {f"lora_unet_{path}".replace(".", "_"): m for path, m in reference.named_modules()}
    modules = [make_module(*get_module(state, name), name, table[name]) for name in {k.split(".")[0] for k in state}]
    for module in modules:
        module.multiplier = 1.0
        module.apply_to()
    x = _probe(reference)
    with torch.no_grad():
        unmerged, plain = reference(*x).sample, base.pipe.unet(*x).sample
    before = _denoising_loss(base.pipe, dataset_dir, n_t=2)
    merge(base, [(str(file), 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    with torch.no_grad():
        merged = base.pipe.unet(*x).sample
    assert (unmerged - plain).abs().max() > 1e-3
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()
    after = _denoising_loss(base.pipe, dataset_dir, n_t=2)  # fixed noise and timesteps: the drop is the training's
    assert after < 0.99 * before, (before, after)

    with pytest.raises(UserError, match="cannot be resized") as e:
        resize(file, tmp_path / "small.safetensors", rank=2)
    assert "--rank" in e.value.hint


def test_previews_stack_lycoris_files_with_a_lora_as_the_merged_checkpoint_and_undo_them(tmp_path):
    """A LoHa, a LoKr (put into the weights) and a plain LoRA (diffusers' adapter) stacked in the previewer give the
    UNet the checkpoint with all three merged has; with none the weights are the base's again, bit for bit."""
    import copy

    from sdlora.generate import Previewer
    from sdlora.merge import merge

    merged = load_base("tiny")
    files = []
    for kind in ("loha", "lokr", "lora"):
        unet = copy.deepcopy(merged.pipe.unet)
        adapter = adapters.get(kind)
        if kind == "lora":
            params = adapter.attach(unet, ATTN, rank=4, alpha=2.0)
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        else:
            _attach(unet, _config(adapter=kind))
        files.append((str(tmp_path / f"{kind}.safetensors"), 0.7))
        save_lora(files[-1][0], kohya_state_dict(unet, {}, adapter=adapter),
                  adapter.metadata(rank=4, alpha=2.0, dropout=0.0, conv_rank=2, conv_alpha=3.0))

    prev = Previewer(load_base("tiny"), device="cpu")
    unet = prev.pipe.unet
    x = _probe(unet)
    with torch.no_grad():
        base_out = unet(*x).sample
        prev.set_loras(files)
        stacked = unet(*x).sample
        prev.set_loras(files[:1])  # re-weighting: the others come out, LoHa stays in
        prev.set_loras([])
        assert torch.equal(unet(*x).sample, base_out)
    merge(merged, files, tmp_path / "merged.safetensors", precision="fp32")
    with torch.no_grad():
        assert (stacked - base_out).abs().max() > 1e-3
        assert torch.allclose(merged.pipe.unet(*x).sample, stacked, atol=1e-4)
