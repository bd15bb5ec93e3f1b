"""Adapter types: each provides what training, export, merge, resize and info call, and LoRA's calls agree with peft
and with its own file layout on the tiny model."""

import inspect

import pytest
import torch

from sdlora import adapters
from sdlora.adapters.type import AdapterType
from sdlora.models import load_base

CALLS = [name for name, _ in inspect.getmembers(AdapterType, inspect.isfunction) if not name.startswith("_")]
FACTS = {"name": str, "network_module": str, "key_suffixes": tuple}


@pytest.mark.parametrize("kind", sorted(adapters.TYPES))
def test_every_adapter_type_provides_what_sdlora_calls(kind):
    adapter = adapters.get(kind)
    assert set(CALLS) == {"attach", "layers", "set_strength", "state_dict", "read", "delta", "metadata"}
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
    x = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
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
