"""Adapter types: each provides what training, export, merge, resize and info call, and LoRA's calls agree with peft
and with its own file layout on the tiny model."""

import inspect
import json

import pytest
import torch

from sdlora import adapters
from sdlora.adapters.type import AdapterType
from sdlora.models import load_base
from conftest import tiny_latents

CALLS = [name for name, _ in inspect.getmembers(AdapterType, inspect.isfunction) if not name.startswith("_")]
FACTS = {"name": str, "network_module": str, "key_suffixes": tuple, "conv": bool, "dora": bool}


@pytest.mark.parametrize("kind", sorted(adapters.TYPES))
def test_every_adapter_type_provides_what_sdlora_calls(kind):
    adapter = adapters.get(kind)
    assert set(CALLS) == {"attach", "layers", "set_strength", "state_dict", "read", "delta", "describe", "metadata"}
    for name in CALLS:
        ours = getattr(adapter, name, None)
        assert callable(ours), f"{kind} lacks {name}"
        wanted = list(inspect.signature(getattr(AdapterType, name)).parameters)[1:]
        assert list(inspect.signature(ours).parameters)[:len(wanted)] == wanted, f"{kind}.{name} takes other arguments"
    for name, kind_of in FACTS.items():
        assert isinstance(getattr(adapter, name), kind_of), f"{kind}.{name}"
    assert adapter.metadata(rank=4, alpha=2.0, dropout=0.0)["ss_network_module"] == adapter.network_module


def test_an_unknown_adapter_type_is_one_line():
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="unknown adapter type 'lohaa'") as e:
        adapters.get("lohaa")
    assert "lora" in e.value.hint


def test_lora_parameters_come_from_its_layers_and_its_file_gives_its_weight_change():
    """The trainable parameters are exactly the layers' down and up matrices (not whatever a name matches); strength 0
    is the base; the written tensors read back to the same modules, and delta is what the layer adds to its weight."""
    lora = adapters.get("lora")
    unet = load_base("tiny").pipe.unet
    x = (tiny_latents(1, torch.Generator().manual_seed(0)), torch.tensor([500]),
         torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        base = unet(*x).sample
    params = lora.attach(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=2.0)
    layers = lora.layers(unet)
    assert len(params) == 2 * len(layers) > 0
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        lora.set_strength(unet, 0.0)
        assert torch.equal(unet(*x).sample, base)
        lora.set_strength(unet, 1.0)
        assert not torch.allclose(unet(*x).sample, base)

    named = {path.replace(".", "_"): layer for path, layer in layers.items()}
    state = lora.state_dict(named)
    assert set(state) == {name + s for name in named for s in lora.key_suffixes}
    read = lora.read({"lora_unet_" + k: v for k, v in state.items()}, {})
    assert read["layout"] == "kohya" and not read["stray"] and len(read["modules"]) == len(layers)
    path, layer = next(iter(layers.items()))
    weights = read["modules"]["lora_unet_" + path.replace(".", "_")]
    assert weights[2] == 2.0
    with torch.no_grad():
        probe = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
        added = layer(probe) - layer.base_layer(probe)
    assert torch.allclose(probe @ lora.delta(weights).T, added, atol=1e-6)


def _perturbed(kind, unet, **kw):
    """`kind`'s layers on the UNet's attention (and LoCon's convolutions), every trained tensor moved off its start."""
    from sdlora.families.targets import UNET_CONV3X3_TARGETS, UNET_CONV_OTHER_TARGETS

    adapter = adapters.get(kind)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (UNET_CONV_OTHER_TARGETS if adapter.conv else [])
    params = adapter.attach(unet, targets, rank=4, alpha=2.0, conv_targets=UNET_CONV3X3_TARGETS if adapter.conv else [],
                            conv_rank=2, conv_alpha=3.0, **kw)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return adapter, params


@pytest.mark.slow
@pytest.mark.parametrize("kind,rslora", [("locon", True), ("dora", False)])
def test_locon_and_dora_files_give_the_trained_layers_change(kind, rslora, tmp_path):
    """Written in the kohya/LyCORIS layout and read back, each module changes its layer's output as the trained layer
    does (conv 3x3 at conv rank and alpha; rsLoRA's alpha/sqrt(rank) written as an alpha loaders scale by alpha/rank;
    DoRA's magnitude per output channel); strength 0 is the base."""
    from sdlora.export import check_file
    from sdlora.lora import kohya_modules, kohya_state_dict, save_lora

    unet = load_base("tiny").pipe.unet
    x = (tiny_latents(1, torch.Generator().manual_seed(0)), torch.tensor([500]),
         torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        base = unet(*x).sample
    adapter, params = _perturbed(kind, unet, rslora=rslora)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    state = kohya_state_dict(unet, {}, adapter=adapter)
    path = tmp_path / "a.safetensors"
    save_lora(path, state, adapter.metadata(rank=4, alpha=2.0, dropout=0.0, conv_rank=2, conv_alpha=3.0, rslora=rslora))
    result = check_file(path, kohya_modules(unet, {}, adapter=adapter), adapter)
    assert result["ok"] and result["modules"] == len(adapter.layers(unet)), result

    # the layout, by an independent reading of the formulas
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    if kind == "locon":
        layer = adapter.layers(unet)["down_blocks.0.resnets.0.conv1"]
        out, inp, kh, kw = layer.get_base_layer().weight.shape
        assert state[f"{conv}.lora_down.weight"].shape == (2, inp, kh, kw) and kh == 3  # (rank, in, kh, kw)
        assert state[f"{conv}.lora_up.weight"].shape == (out, 2, 1, 1)
        assert float(state[f"{conv}.alpha"]) == pytest.approx(3.0 * 2 ** 0.5)  # rsLoRA: alpha * sqrt(conv rank)
        assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight" in state
        w = (state[f"{conv}.lora_up.weight"].flatten(1) @ state[f"{conv}.lora_down.weight"].flatten(1)) \
            * float(state[f"{conv}.alpha"]) / 2
        probe = torch.randn(1, inp, 6, 6)
        with torch.no_grad():
            added = layer(probe) - layer.get_base_layer()(probe)
        assert torch.allclose(torch.nn.functional.conv2d(probe, w.reshape(layer.get_base_layer().weight.shape),
                                                         padding=1), added, atol=1e-5)
    else:
        name, path_ = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", \
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        layer = adapter.layers(unet)[path_]
        weight = layer.get_base_layer().weight
        assert state[f"{name}.dora_scale"].shape == (weight.shape[0], 1)  # per output channel, LyCORIS wd_on_output
        v = weight + state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"] * float(state[f"{name}.alpha"]) / 4
        probe = torch.randn(3, weight.shape[1])
        with torch.no_grad():
            wanted = layer(probe) - layer.get_base_layer()(probe)
        dora_weight = state[f"{name}.dora_scale"] * v / v.norm(dim=1, keepdim=True)
        assert torch.allclose(probe @ (dora_weight - weight).T, wanted, atol=1e-5)
        # at another strength the layer blends as loaders blend the weights: W + s * (W_dora - W)
        adapter.set_strength(unet, 0.5)
        with torch.no_grad():
            assert torch.allclose(layer(probe) - layer.get_base_layer()(probe), 0.5 * wanted, atol=1e-5)
        adapter.set_strength(unet, 1.0)
        with torch.no_grad():
            assert torch.allclose(layer(probe) - layer.get_base_layer()(probe), wanted, atol=1e-6)
    with torch.no_grad():
        adapter.set_strength(unet, 0.0)
        assert torch.equal(unet(*x).sample, base)


@pytest.mark.parametrize("case", ["linear", "linear-no-bias", "linear-dropout", "linear-bf16", "conv3x3",
                                  "conv3x3-stride2", "conv1x1", "conv3x3-bf16"])
def test_dora_layers_match_peft_without_forming_the_change(case, monkeypatch):
    """sdlora's DoRA layers (one matmul or convolution with the magnitude folded into the weight, the norms without
    forming BA) give the output and every gradient peft's own DoRA layers give: fp32 on the CPU, and within bf16
    rounding under bf16 autocast; with dropout in training, peft's forward runs with the same norms. A fresh adapter
    gives the base's output exactly."""
    from peft.tuners.lora import dora

    from sdlora.adapters.lora import ADAPTER, DORA_CONV

    torch.manual_seed(0)
    conv = case.startswith("conv")
    if conv:
        kernel, stride = (1, 1) if case == "conv1x1" else (3, 2 if case == "conv3x3-stride2" else 1)
        base, x = torch.nn.Conv2d(8, 16, kernel, stride, padding=kernel // 2), torch.randn(2, 8, 10, 10)
    else:
        base, x = torch.nn.Linear(40, 96, bias=case != "linear-no-bias"), torch.randn(3, 7, 40)
    bf16 = case.endswith("bf16")
    model = torch.nn.Sequential(base.to(torch.bfloat16 if bf16 else torch.float32))
    params = DORA_CONV.attach(model, [] if conv else ["0"], rank=4, alpha=2.0, conv_targets=["0"] if conv else [],
                              conv_rank=4, conv_alpha=2.0, dropout=0.3 if case == "linear-dropout" else 0.0)
    layer = model[0]

    def forward(module=model):
        torch.manual_seed(1)  # the same dropout mask for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(x)
    if case != "linear-dropout":
        assert torch.equal(forward(), forward(layer.base_layer))  # fresh: the base's output
    for p in params:
        p.data.normal_(0, 0.5)  # the change, and the magnitude away from the base's norms
    x.requires_grad_(True)
    with monkeypatch.context() as m:
        for name in ("get_weight_norm", "get_lora_weight"):  # the change is never formed
            m.setattr(dora.DoraLinearLayer, name, None)
            m.setattr(dora._DoraConvNdLayer, name, None)
        if case != "linear-dropout":  # nor the base layer's output rescaled after it
            m.setattr(layer.lora_magnitude_vector[ADAPTER], "forward", None)
        fast = forward()
    for module in (layer, layer.lora_magnitude_vector[ADAPTER]):  # peft's own path
        module.__dict__.pop("forward", None)
    peft = forward()
    assert not torch.allclose(fast.float(), forward(layer.base_layer).float(), atol=1e-1)

    def assert_close(a, b):  # bf16: each tensor as a whole within bf16's rounding (elements can cancel)
        if bf16:
            assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_close(fast, peft)
    for a, b in zip(torch.autograd.grad(fast.float().square().sum(), [x, *params]),
                    torch.autograd.grad(peft.float().square().sum(), [x, *params])):
        assert_close(a, b)


def test_metadata_of_each_type_is_what_kohya_and_lycoris_write():
    lora = adapters.get("lora").metadata(rank=8, alpha=4.0, dropout=0.0, conv_rank=4, conv_alpha=2.0)
    assert lora["ss_network_module"] == "networks.lora" and "ss_network_args" not in lora
    locon = adapters.get("locon").metadata(rank=8, alpha=4.0, dropout=0.0, conv_rank=4, conv_alpha=2.0)
    assert locon["ss_network_module"] == "networks.lora"
    assert json.loads(locon["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    dora = adapters.get("dora").metadata(rank=8, alpha=4.0, dropout=0.0, rslora=True)
    assert dora["ss_network_module"] == "lycoris.kohya"
    assert json.loads(dora["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    assert float(dora["ss_network_alpha"]) == pytest.approx(4.0 * 8 ** 0.5)  # the alpha in the file's tensors
    assert json.loads(dora["sdlora_rslora"]) == {"alpha": 4.0}


def test_locon_names_convolutions_as_kohya_does_for_sdxl():
    """On the SDXL-like model kohya names the ResNet layers in the original block numbering: conv1 -> in_layers_2,
    conv2 -> out_layers_3, conv_shortcut -> skip_connection, time_emb_proj -> emb_layers_1, the down/upsamplers
    input_blocks_N_0_op / output_blocks_N_M_conv."""
    from sdlora.lora import kohya_state_dict
    from test_families import build_pipeline

    unet = build_pipeline("sdxl").unet
    _perturbed("locon", unet)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
             for k in kohya_state_dict(unet, {}, sgm_unet=True, adapter=adapters.get("locon"))}
    for expected in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
                     "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_middle_block_0_in_layers_2",
                     "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_0_0_skip_connection"):
        assert expected in names, (expected, sorted(n for n in names if "attn" not in n)[:12])
    assert not any("resnets" in n or "down_blocks" in n for n in names)


@pytest.mark.slow
def test_a_locon_run_verifies_merges_as_diffusers_loads_it_and_resizes(tmp_path, dataset_dir):
    """A 2-step LoCon run (rsLoRA scaling): the verify event passes (diffusers' loader, and the file against the
    trained layers); the checkpoint merged at strength 1 equals the base with the file loaded by diffusers; info and
    resize read the file. (DoRA's file against its trained layers: the test above; DoRA training runs the same path.)"""
    from conftest import small_config
    from sdlora.info import describe
    from sdlora.merge import merge
    from sdlora.resize import resize
    from sdlora.rundir import read_events
    from sdlora.train import train

    run = tmp_path / "locon"
    train(small_config(dataset_dir, steps=2, adapter="locon", sample_every=0, save_every=0, train_text_encoder=False,
                       unet_lr=3e-3, use_rslora=True), run, progress_bar=False)
    verify = next(e for e in read_events(run) if e["type"] == "verify")
    assert verify["ok"] and verify["file_check"]["ok"] and verify["file_check"]["modules"] > 0, verify
    assert "note" not in verify
    file = run / "lora.safetensors"
    info = describe(file)
    assert info["conv3x3_modules"] > 0 and info["dora_modules"] == 0

    base = load_base("tiny")
    x = (tiny_latents(1, torch.Generator().manual_seed(0)), torch.tensor([500]),
         torch.randn(1, 77, base.pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)))
    loaded = load_base("tiny").pipe
    loaded.load_lora_weights(str(file))
    with torch.no_grad():
        unmerged, plain = loaded.unet(*x).sample, base.pipe.unet(*x).sample
    merge(base, [(str(file), 1.0)], tmp_path / "merged.safetensors", precision="fp32")
    with torch.no_grad():
        merged = base.pipe.unet(*x).sample
    assert (unmerged - plain).abs().max() > 1e-3  # the file changes the UNet at all
    assert torch.allclose(merged, unmerged, atol=1e-4)

    rows = resize(file, tmp_path / "small.safetensors", rank=2)
    assert rows and all(r["new_rank"] <= 2 for r in rows)
    assert describe(tmp_path / "small.safetensors")["conv3x3_modules"] == info["conv3x3_modules"]


@pytest.mark.slow
def test_a_dora_run_verifies_its_file_and_says_what_diffusers_leaves_out(tmp_path, dataset_dir):
    """A 2-step DoRA run: the file against the trained layers passes; the verify event notes that diffusers' loader
    leaves DoRA's magnitudes out; info counts the modules; resize keeps the magnitudes."""
    from conftest import small_config
    from sdlora.info import describe
    from sdlora.resize import resize
    from sdlora.rundir import read_events
    from sdlora.train import train

    run = tmp_path / "dora"
    train(small_config(dataset_dir, steps=2, adapter="dora", sample_every=0, save_every=0, train_text_encoder=False,
                       unet_lr=3e-3), run, progress_bar=False)
    verify = next(e for e in read_events(run) if e["type"] == "verify")
    assert verify["ok"] and verify["file_check"]["ok"] and verify["file_check"]["modules"] > 0, verify
    assert "dora_scale" in verify["note"]
    info = describe(run / "lora.safetensors")
    assert info["dora_modules"] > 0 and info["conv3x3_modules"] == 0
    resize(run / "lora.safetensors", tmp_path / "small.safetensors", rank=2)
    assert describe(tmp_path / "small.safetensors")["dora_modules"] == info["dora_modules"]


def test_the_file_check_reads_layers_on_an_fp8_base_that_computes_in_bf16(tmp_path):
    """On a GPU an fp8 base (sdlora.quantize) gives its layers bf16 weights at each use; the check after training
    compares the file against fp32 copies of those layers all the same."""
    from sdlora.export import check_file
    from sdlora.lora import kohya_modules, kohya_state_dict, save_lora
    from sdlora.quantize import quantize_base

    unet = load_base("tiny").pipe.unet.to(torch.bfloat16)
    quantize_base(unet, [], "fp8")
    adapter, _ = _perturbed("lora", unet, rslora=False)
    path = tmp_path / "a.safetensors"
    save_lora(path, kohya_state_dict(unet, {}, adapter=adapter),
              adapter.metadata(rank=4, alpha=2.0, dropout=0.0, conv_rank=2, conv_alpha=3.0, rslora=False))
    result = check_file(path, kohya_modules(unet, {}, adapter=adapter), adapter)
    assert result["ok"] and result["modules"] == len(adapter.layers(unet)), result
