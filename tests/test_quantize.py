"""Quantized base (--base-precision): the tiny model stored in fp8/int8/nf4 trains a LoRA that exports as usual."""

import pytest
import torch
import torch.nn.functional as F

from conftest import draw_dataset, need, tiny_latents
from sdlora.config import TrainConfig
from sdlora.errors import UserError
from sdlora.export import verify
from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS
from sdlora.adapters.lora import ADAPTER, LORA
from sdlora.lora import kohya_state_dict, save_lora
from sdlora.models import load_base
from sdlora.quantize import check_precision, quantize_base, stored_bytes

STEPS = 8


def _train_by_hand(precision: str) -> dict:
    """Load the tiny model, store its base in `precision`, add LoRAs (UNet + text encoder) and train STEPS steps on
    one fixed batch, as the training loop does (autograd.grad of the LoRA parameters, AdamW)."""
    base = load_base("tiny")
    pipe = base.pipe
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for model in (unet, text_encoder):
        model.requires_grad_(False)
    before = stored_bytes(unet) + stored_bytes(text_encoder)
    note = quantize_base(unet, [text_encoder], precision)
    after = stored_bytes(unet) + stored_bytes(text_encoder)
    q_proj = text_encoder.get_submodule(_te_path(text_encoder, "encoder.layers.0.self_attn.q_proj"))
    to_q = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    torch.manual_seed(0)
    params = LORA.attach(unet, UNET_TARGETS["attn"], rank=4, alpha=2.0) + LORA.attach(text_encoder, TEXT_TARGETS["attn"], rank=4, alpha=2.0)
    init = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    latents, noise = tiny_latents(2, gen), tiny_latents(2, gen)
    timesteps = torch.tensor([100, 600])
    ids = pipe.tokenizer(["a red circle", "a blue square"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    from diffusers import DDPMScheduler

    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    stored = _stored_weights(to_q, conv, q_proj)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(STEPS):
        model_pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(model_pred.float(), noise)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        losses.append(loss.item())
    return dict(pipe=pipe, unet=unet, text_encoder=text_encoder, params=params, init=init, grads=grads, note=note,
                losses=losses, before=before, after=after, stored=stored,
                stored_after=_stored_weights(to_q, conv, q_proj),
                lora_layers=[unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
                             text_encoder.get_submodule(_te_path(text_encoder, "encoder.layers.0.self_attn.q_proj"))])


def _te_path(text_encoder, path):
    # transformers 5 dropped CLIPTextModel's `text_model` level; older versions have it
    return path if hasattr(text_encoder, "encoder") else "text_model." + path


def _stored_weights(*layers):
    """What each layer holds as its weight storage (fp8: the parametrization's original; bnb: the packed weight)."""
    out = []
    for layer in layers:
        layer = getattr(layer, "base_layer", layer)  # under a peft LoRA layer once adapters are added
        if hasattr(layer, "parametrizations"):
            out.append(layer.parametrizations.weight.original0.detach().clone())
        else:
            out.append(layer.weight.detach().clone())
    return out


@pytest.fixture(scope="module")
def reference():
    """The same run on the unquantized base: its LoRA's initial values and kohya keys."""
    run = _train_by_hand("auto")
    keys = set(kohya_state_dict(run["unet"], {"lora_te_": run["text_encoder"]}))
    return dict(init=run["init"], keys=keys, losses=run["losses"])


# precision -> (dtype its Linear weights are stored in, dtype of its convolutions' weights, peft's LoRA layer on top)
CASES = {
    "fp8": (torch.float8_e4m3fn, torch.float8_e4m3fn, "peft.tuners.lora.layer.Linear"),
    "int8": (torch.int8, torch.float32, "peft.tuners.lora.bnb.Linear8bitLt"),
    "nf4": (torch.uint8, torch.float32, "peft.tuners.lora.bnb.Linear4bit"),
}


@pytest.mark.parametrize("precision", [p if p == "fp8" else pytest.param(p, marks=pytest.mark.slow)
                                       for p in sorted(CASES)])  # the quick tier keeps fp8
def test_lora_trains_on_a_quantized_base_and_exports_for_the_plain_one(precision, reference, tmp_path):
    if precision != "fp8":  # torch's own float8 needs no extra package
        need("bitsandbytes", "pip install bitsandbytes")
    linear_dtype, conv_dtype, peft_layer = CASES[precision]
    run = _train_by_hand(precision)

    # the base is stored quantized: weight dtypes, and fewer bytes in all (the tiny model's text encoder is mostly its
    # token table, which stays as it is)
    to_q, conv, q_proj = run["stored"]
    assert to_q.dtype == q_proj.dtype == linear_dtype and conv.dtype == conv_dtype
    assert run["after"] < run["before"], run["note"]
    assert run["note"].startswith(f"base weights stored as {precision}"), run["note"]
    assert {f"{type(m).__module__}.{type(m).__name__}" for m in run["lora_layers"]} == {peft_layer}
    assert run["unet"].dtype == run["text_encoder"].dtype == torch.float32  # what pipelines cast prompt embeddings to

    # the LoRA is fp32 and starts exactly where it does on the unquantized base (never rounded through fp8)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in run["params"])
    assert all(torch.equal(a, b) for a, b in zip(run["init"], reference["init"]))
    # it trains: every LoRA tensor gets a finite, non-zero gradient, and the loss on the fixed batch goes down
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in run["grads"])
    losses = run["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.95 * losses[0], losses
    # close to the unquantized run's curve
    assert abs(losses[-1] - reference["losses"][-1]) < 0.2 * reference["losses"][-1], (losses, reference["losses"])
    # the frozen base did not move
    assert all(torch.equal(a, b) for a, b in zip(run["stored"], run["stored_after"]))
    # the quantized model still samples through the plain pipeline, as the training loop's previews do
    image = run["pipe"]("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()

    # the export is the usual fp32 kohya file, key for key, and loads completely onto the unquantized base
    state = kohya_state_dict(run["unet"], {"lora_te_": run["text_encoder"]})
    assert set(state) == reference["keys"]
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"],
                       run["lora_layers"][0].lora_B[ADAPTER].weight.detach())
    path = tmp_path / "lora.safetensors"
    save_lora(path, state, {})
    result = verify(path, "tiny")
    assert result["ok"] and result["keys_consumed"] == result["keys_written"] == len(state), result


def test_base_precision_is_checked_before_anything_loads(tmp_path, monkeypatch, capsys):
    from sdlora.cli import main

    TrainConfig(dataset="d", base_precision="fp8").validate()
    with pytest.raises(UserError, match="base_precision = 'fp4': must be one of auto, fp8, int8, nf4"):
        TrainConfig(dataset="d", base_precision="fp4").validate()
    data = draw_dataset(tmp_path / "d", n=2)

    def cli(precision, out):
        code = main(["train", str(data), "--out", str(tmp_path / out), "--base-precision", precision, "--quiet"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return code, lines

    # bitsandbytes missing: int8/nf4 say so in one line; fp8 would still run
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    for precision in ("int8", "nf4"):
        code, lines = cli(precision, f"missing-{precision}")
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == (f"sdlora: error: base_precision {precision} needs bitsandbytes, which is not installed "
                            "(hint: pip install bitsandbytes, or use --base-precision fp8 (no extra package))")
    monkeypatch.undo()

    # a bitsandbytes build without CPU kernels (older ones were CUDA-only): refused on a CPU, in one line, early
    bnb = need("bitsandbytes", "pip install bitsandbytes")

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no CPU kernel")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_kernel)
    with pytest.raises(UserError, match="base_precision nf4 cannot run on this CPU"):
        check_precision("nf4", cuda=False)
    check_precision("nf4", cuda=True)  # on a GPU bitsandbytes' CUDA kernels do it
    if not torch.cuda.is_available():
        code, lines = cli("nf4", "no-kernel")
        assert code == 2 and len(lines) == 1 and lines[0].startswith(
            f"sdlora: error: base_precision nf4 cannot run on this CPU with bitsandbytes {bnb.__version__} "
            "(no CPU kernel) (hint: use --base-precision fp8"), lines
        assert not (tmp_path / "no-kernel" / "samples").exists()  # stopped before training began


def test_int8_with_checkpointing_is_refused_on_a_gpu(monkeypatch):
    """bitsandbytes' int8 layers break torch.utils.checkpoint on CUDA (measured, docs/benchmarks.md): said up front."""
    need("bitsandbytes", "pip install bitsandbytes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="int8 does not train with gradient_checkpointing on a GPU") as e:
        TrainConfig(dataset="d", base_precision="int8", gradient_checkpointing=True).validate()
    assert e.value.hint == "use --base-precision nf4 or fp8, or turn gradient_checkpointing off"
    TrainConfig(dataset="d", base_precision="int8").validate()
    TrainConfig(dataset="d", base_precision="nf4", gradient_checkpointing=True).validate()
