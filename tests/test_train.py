"""Training on the tiny model, end to end: what the run leaves, what other loaders see, resume, stop, errors."""

import functools
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import render_sample, draw_dataset, small_config, tiny_latents
from sdlora import dataset as ds
from sdlora.rundir import read_events
from sdlora.tiny import MODEL_DIR


def _plain_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_samples_reproduce_in_plain_diffusers(trained_run):
    """The reproducibility contract: base folder + exported file + the sample event's settings = the sample."""
    events = read_events(trained_run)
    samples = [e for e in events if e["type"] == "sample"]
    assert {e["step"] for e in samples} == {0, 10, 20}  # step-0 baseline, every 10, the end
    for field in ("path", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "width",
                  "height", "strength"):
        assert field in samples[0]
    base = _plain_pipeline()
    for step, lora in ((20, trained_run / "lora.safetensors"), (10, trained_run / "lora-step-000010.safetensors")):
        pipe = _plain_pipeline()
        pipe.load_lora_weights(str(lora))
        for event in (e for e in samples if e["step"] == step):
            sample = np.asarray(__import__("PIL.Image").Image.open(event["path"]), dtype=np.float32)
            redone = render_sample(pipe, event)
            assert np.abs(redone - sample).mean() < 1.0, (event, np.abs(redone - sample).mean())  # < 1/255 of range
            assert np.abs(render_sample(base, event) - sample).mean() > 1.0  # the LoRA really changed the image


def test_export_layout_alpha_and_metadata(trained_run):
    with safe_open(str(trained_run / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)  # nothing stray
    assert len(keys) == 3 * len(names)
    unet = {n for n in names if n.startswith("lora_unet_")}
    te = {n for n in names if n.startswith("lora_te_text_model_encoder_layers_")}
    assert unet | te == names and te and unet
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert all(float(a) == 2.0 for a in alphas.values())  # the trained alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "zxq" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["ss_steps"] == "20" and meta["ss_num_train_images"] == "8"
    assert "zxq" in json.loads(meta["ss_tag_frequency"])["dataset"]
    verify = next(e for e in read_events(trained_run) if e["type"] == "verify")
    assert verify["ok"] and verify["keys_consumed"] == verify["keys_written"] == len(keys)
    assert verify["strength0_max_diff"] == 0.0 and verify["strength1_mean_diff"] > 0


def test_strength_zero_is_the_base_model(trained_run):
    from sdlora.generate import Previewer

    base = np.asarray(_plain_pipeline()("a red circle", num_inference_steps=6, height=64, width=64, guidance_scale=7.0,
                                        generator=torch.Generator("cpu").manual_seed(3)).images[0])
    prev = Previewer("tiny", device="cpu")
    lora = str(trained_run / "lora.safetensors")
    kw = dict(seed=3, steps=6, scheduler=type(_plain_pipeline().scheduler).__name__)  # the model's own sampler
    prev.set_loras([(lora, 0.0)])
    zero = np.asarray(prev.image("a red circle", **kw))
    prev.set_loras([(lora, 1.0)])
    one = np.asarray(prev.image("a red circle", **kw))
    prev.set_loras([(lora, -1.0)])
    minus = np.asarray(prev.image("a red circle", **kw))
    assert np.array_equal(zero, base)
    assert not np.array_equal(one, base) and not np.array_equal(minus, one)


def _hand_written_kohya(path, rank=2, alpha=1.0):
    """A kohya-layout file as another trainer would write it, built from module names alone.

    (Its text-encoder part includes out_proj, as kohya's always does: diffusers 0.42 cannot detect the format of a
    text-encoder LoRA without it.)"""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    pipe = _plain_pipeline()
    state = {}
    for prefix, model, names in (("lora_unet_", pipe.unet, ("attn1.to_q", "attn2.to_k", "attn1.to_out.0")),
                                 ("lora_te_text_model_", pipe.text_encoder, ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"))):
        for path_, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and path_.endswith(names):
                key = prefix + path_.replace(".", "_")
                state[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.5
                state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.5
                state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def test_foreign_kohya_file_previews(tmp_path):
    from sdlora.generate import Previewer

    lora = str(_hand_written_kohya(tmp_path / "other.safetensors"))
    prev = Previewer("tiny", device="cpu")
    kw = dict(seed=1, steps=4)
    base = np.asarray(prev.image("a blue star", **kw))
    prev.set_loras([(lora, 1.0)])
    with_lora = np.asarray(prev.image("a blue star", **kw))
    prev.set_loras([(lora, 0.0)])
    assert np.array_equal(np.asarray(prev.image("a blue star", **kw)), base)
    assert np.abs(with_lora.astype(float) - base).mean() > 1.0


@pytest.mark.slow
def test_diffusers_layout_export_loads(tmp_path, dataset_dir):
    from sdlora.generate import Previewer
    from sdlora.train import train

    run = tmp_path / "run"
    train(small_config(dataset_dir, steps=6, sample_every=100, save_every=100, export_diffusers=True), run,
          progress_bar=False)
    prev = Previewer("tiny", device="cpu")
    images = {}
    for name in ("lora.safetensors", "lora-diffusers.safetensors"):
        prev.set_loras([(str(run / name), 1.0)])
        images[name] = np.asarray(prev.image("zxq, a red circle", seed=0, steps=4), dtype=np.float32)
        prev.set_loras([])
    assert np.abs(images["lora.safetensors"] - images["lora-diffusers.safetensors"]).mean() < 0.5


def _denoising_loss(pipe, dataset_dir, n_t=8):
    """Mean noise-prediction error over the dataset at fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    data = ds.ingest(dataset_dir, trigger="zxq")
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for r in data.records:
            px = ds.prepare_image(r.image, (64, 64), random_crop=False, flip=False, rng=random.Random(0))[0]
            latents = pipe.vae.encode(px[None]).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([r.caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = pipe.text_encoder(ids)[0]
            for t in torch.linspace(50, 950, n_t).long():
                noise = torch.randn(latents.shape, generator=g)
                pred = pipe.unet(sched.add_noise(latents, noise, t[None]), t[None], hidden).sample
                losses.append(torch.mean((pred - noise) ** 2).item())
    return float(np.mean(losses))


def test_training_lowers_the_loss(trained_run, dataset_dir):
    pipe = _plain_pipeline()
    before = _denoising_loss(pipe, dataset_dir)
    pipe.load_lora_weights(str(trained_run / "lora.safetensors"))
    after = _denoising_loss(pipe, dataset_dir)
    # fixed noise and timesteps, so any drop is real; 20 steps of rank 4 move a random-init base ~4%
    assert after < 0.98 * before, (before, after)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path, dataset_dir):
    from sdlora.lora import read_lora
    from sdlora.train import train

    kw = dict(sample_every=1000, save_every=10, caption_dropout=0.2, shuffle_tags=True, flip=True)
    train(small_config(dataset_dir, steps=20, **kw), tmp_path / "full", progress_bar=False)
    train(small_config(dataset_dir, steps=10, **kw), tmp_path / "split", progress_bar=False)
    train(small_config(dataset_dir, steps=20, **kw), tmp_path / "split", resume=True, progress_bar=False)

    def last_loss(run):
        return [e for e in read_events(run) if e["type"] == "progress"][-1]["loss"]

    assert any(e["type"] == "warning" and "resumed from step-000010" in e["message"] for e in read_events(tmp_path / "split"))
    assert last_loss(tmp_path / "split") == pytest.approx(last_loss(tmp_path / "full"), rel=1e-4)
    a, _ = read_lora(tmp_path / "full" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "split" / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_stop_file_stops_and_saves(tmp_path, dataset_dir):
    from sdlora import launch, rundir

    run = tmp_path / "stopme"
    run.mkdir()
    (run / "config.json").write_text(small_config(dataset_dir, steps=5000, sample_every=10_000, save_every=10_000).to_json())
    proc = launch.start(run)
    deadline = time.time() + 120
    while not any(e["type"] == "progress" for e in read_events(run)):
        assert proc.poll() is None, (run / "log.txt").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.3)
    assert rundir.status(run) == "running"
    rundir.request(run, "STOP")
    assert proc.wait(timeout=120) == 0, (run / "log.txt").read_text()[-2000:]
    events = read_events(run)
    stopped = next(e for e in events if e["type"] == "stopped")
    assert 0 < stopped["step"] < 5000
    assert (run / "lora.safetensors").exists() and rundir.status(run) == "stopped"
    assert next(e for e in events if e["type"] == "verify")["ok"]


@pytest.mark.slow
def test_a_spare_process_trains_the_run_handed_to_it_as_a_fresh_process_would(tmp_path, dataset_dir):
    """The app starts a training process ahead (sdlora.spare.Spare) so that a run skips the imports; a run handed to
    it gives the same file, events and log as a fresh process, and a spare that died hands the run to a fresh process."""
    from safetensors.torch import load_file

    from sdlora import launch, rundir
    from sdlora.spare import Spare

    spare, dead = Spare(), Spare()
    dead.proc.kill()
    dead.proc.wait()
    assert spare.ready(timeout=180)
    procs = {}
    for name, given in (("spare", spare), ("fresh", dead)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(small_config(dataset_dir, steps=6, sample_every=3).to_json())
        procs[name] = launch.start(run, spare=given)
        assert procs[name].wait(timeout=300) == 0, (run / "log.txt").read_text()[-2000:]
        assert rundir.status(run) == "done" and (run / "pid").read_text() == str(procs[name].pid)
        assert "done at step 6" in (run / "log.txt").read_text()  # its output went to the run's log
    assert procs["spare"].args[-1] == "spare" and procs["fresh"].args[-1] == "--resume"
    assert spare.proc is None and spare.take(tmp_path / "spare") is None  # one run per spare
    a, b = load_file(tmp_path / "spare" / "lora.safetensors"), load_file(tmp_path / "fresh" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    events = {name: read_events(tmp_path / name) for name in procs}
    assert [e["type"] for e in events["spare"]] == [e["type"] for e in events["fresh"]]
    # the spare's setup counts from the hand-over: it had imported everything before
    process_s = {name: next(e for e in events[name] if e["type"] == "start")["setup_s"]["process"] for name in procs}
    assert process_s["spare"] < process_s["fresh"]
    idle = Spare()
    idle.close()  # an untaken spare ends with its owner
    assert idle.proc is None


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_save(tmp_path, dataset_dir):
    from sdlora.errors import UserError
    from sdlora.train import train

    run = tmp_path / "nan"
    config = small_config(dataset_dir, steps=400, unet_lr=1e6, text_encoder_lr=1e6, min_snr_gamma=0.0,
                          sample_every=10_000, save_every=1)
    with pytest.raises(UserError, match="loss became"):
        train(config, run, progress_bar=False)
    error = read_events(run)[-1]
    assert error["type"] == "error" and "loss became" in error["message"] and "learning" in error["hint"].replace("_lr", " learning")
    assert not (run / "lora.safetensors").exists()  # never overwritten with broken weights
    assert list(run.glob("lora-step-*.safetensors"))


def test_black_samples_are_flagged_with_the_likely_cause(tmp_path, dataset_dir, monkeypatch):
    """Samples whose drawing overflows (NaN latents: an fp16 base at high guidance, say) come out black; the run says
    so, with what to change, and trains on."""
    import diffusers
    from sdlora.train import train

    prepare = diffusers.StableDiffusionPipeline.prepare_latents
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "prepare_latents",  # only sampling draws latents this way
                        lambda *args, **kwargs: prepare(*args, **kwargs) * float("nan"))
    run = tmp_path / "black"
    train(small_config(dataset_dir, steps=2, sample_every=2, save_every=2, sample_steps=2), run, progress_bar=False)
    events = read_events(run)
    flagged = [e for e in events if e["type"] == "warning" and "came out black" in e["message"]]
    assert [e["step"] for e in flagged] == [0, 2] and flagged[0]["samples"] == [0, 1]
    assert "--mixed-precision bf16" in flagged[0]["message"] and events[-1]["type"] == "done"


def test_every_command_has_help(capsys):
    from sdlora.cli import main

    for command in ("train", "eval", "check", "tags", "caption", "generate", "runs", "merge", "resize", "info"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0 and f"usage: sdlora {command}" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from sdlora.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                 ["train", str(empty), "--out", str(tmp_path / "r")],
                 ["train", str(draw_dataset(tmp_path / "d", n=2)), "--out", str(tmp_path / "r2"), "--rank", "0"]):
        assert main(args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sdlora: error:") and "hint:" in lines[0], lines


@pytest.mark.slow
def test_a_user_error_in_a_shell_is_one_line_and_exit_code_2(tmp_path):
    """What a shell sees: exit code 2 and one line on stderr, no traceback, whatever the libraries print."""
    out = subprocess.run([sys.executable, "-m", "sdlora", "train", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdlora: error: dataset not found") and "hint:" in lines[0], \
        out.stderr


@pytest.mark.slow
def test_cli_train_and_generate(tmp_path, dataset_dir, capsys):
    from sdlora.cli import main

    run = tmp_path / "cli"  # trained in this process (a shell's view of `sdlora train` is the packaging test's)
    assert main(["train", str(dataset_dir), "--base", "tiny", "--out", str(run), "--steps", "4", "--rank", "4",
                 "--alpha", "1", "--trigger", "zxq", "--sample-every", "2", "--save-every", "2", "--seed", "1",
                 "--no-train-text-encoder", "--sample-steps", "3"]) == 0
    shown = capsys.readouterr()
    assert "compatibility check ok" in shown.out + shown.err
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        assert not any(k.startswith("lora_te") for k in f.keys())  # --no-train-text-encoder
    png = tmp_path / "g.png"
    assert main(["generate", "zxq, a red circle", "--base", "tiny", "--lora", str(run / "lora.safetensors"),
                 "--strength", "0.7", "--seed", "2", "--steps", "3", "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size == (64, 64)


def test_captions_reach_the_batches(tmp_path):
    from sdlora.batches import batch_at

    folder = tmp_path / "tags"
    draw_dataset(folder / "3_thing", n=4, captions=False)
    draw_dataset(folder / "plain", n=2, seed=5, captions=False)
    for p in (folder / "3_thing").glob("*.png"):
        p.with_suffix(".txt").write_text("red, big, round, shiny, old")
    (folder / "plain" / "img00.txt").write_text("zxq, blue, small")
    data = ds.ingest(folder, trigger="zxq")
    samples = ds.expand_repeats(data.records)
    assert len(samples) == 4 * 3 + 2
    bucket_of = [(64, 64)] * len(data.records)

    seen, captions = [], []
    config = small_config(folder, batch_size=2, shuffle_tags=True, keep_tags=1, caption_dropout=0.0)
    per_epoch = 7
    for k in range(per_epoch):
        batch = batch_at(k, config, data.records, samples, bucket_of)
        seen += [b[0] for b in batch]
        captions += [b[1] for b in batch]
    assert sorted(seen) == sorted(samples)  # one epoch = every image x its repeats
    assert all(c.startswith("zxq, ") for c in captions if c)  # trigger prepended, kept first by the shuffle
    assert sum(c.count("zxq") for c in captions) == len(captions)  # never doubled
    tails = {tuple(c.split(", ")[1:]) for c in captions if "red" in c}
    assert len(tails) > 1 and all(sorted(t) == sorted(["red", "big", "round", "shiny", "old"]) for t in tails)
    template = [c for i, c in zip(seen, captions) if not data.records[i].captioned]
    assert template and all(c == "zxq, a picture" for c in template)

    dropped = 0
    config = small_config(folder, batch_size=2, caption_dropout=0.5)
    for k in range(400):
        dropped += sum(b[1] == "" for b in batch_at(k, config, data.records, samples, bucket_of))
    assert 0.4 < dropped / 800 < 0.6
    # same seed, same batches: what makes resume exact
    def plan(k, processes=1):
        return [b[:2] for b in batch_at(k, config, data.records, samples, bucket_of, processes)]

    assert plan(123) == plan(123)
    # two processes with batch 2 share out exactly what one process with batch 4 would train on
    config = small_config(folder, batch_size=4, caption_dropout=0.5)
    one = {k: plan(k) for k in range(8)}
    config = small_config(folder, batch_size=2, caption_dropout=0.5)
    for k, batch in one.items():
        two = plan(k, processes=2)
        assert two == batch if len(batch) == 4 else two[:len(batch)] == batch  # a short last batch is topped up


def test_gradient_accumulation_equals_the_whole_batch_at_once():
    """Two micro-batches of 2 images make the same update as one batch of the same 4 images (the step averages the
    micro-batches' gradients, as one batch averages its images')."""
    from accelerate import Accelerator

    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.batches import token_ids
    from sdlora.step import build_step

    g = torch.Generator().manual_seed(0)
    batch = {"mean": tiny_latents(4, g), "std": tiny_latents(4, g).abs() * 0.1,
             "eps": tiny_latents(4, g), "noise": tiny_latents(4, g),
             "timesteps": torch.randint(0, 1000, (4,), generator=g)}
    config = TrainConfig(dataset="-", rank=4, alpha=4.0, steps=10, lr_scheduler="constant", warmup_fraction=0.0)
    adapters = []
    for micro in (4, 2):
        pipe = load_base("tiny").pipe
        step = build_step(Accelerator(cpu=True), pipe, config)
        with torch.no_grad():  # a non-zero B, so that every LoRA parameter has a gradient
            for p in step.params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        ids = token_ids(pipe.tokenizer, ["a red circle", "a blue square", "zxq", ""], torch.device("cpu"))
        parts = [{**{k: v[i:i + micro] for k, v in batch.items()}, "ids_0": ids[i:i + micro]} for i in range(0, 4, micro)]
        loss = step(parts)
        adapters.append((loss.item(), torch.cat([p.grad.flatten() for p in step.params])))  # the averaged gradient
    (loss_one, one), (loss_two, two) = adapters
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    assert one.norm() > 0 and (one - two).norm() / one.norm() < 1e-5


def test_lora_layers_take_bf16_inputs_with_the_same_result():
    """Under bf16 autocast the LoRA layers get the activations in bf16 as they are (peft would cast them to the
    fp32 adapter weights, and autocast back), and the loss and gradients are exactly those of peft's default."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft.tuners.lora import LoraLayer

    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.batches import token_ids
    from sdlora.step import build_step

    g = torch.Generator().manual_seed(0)
    inputs = {"mean": tiny_latents(2, g), "std": tiny_latents(2, g).abs() * 0.1,
              "eps": tiny_latents(2, g), "noise": tiny_latents(2, g),
              "timesteps": torch.randint(0, 1000, (2,), generator=g)}
    pipe = load_base("tiny").pipe
    inputs["ids_0"] = token_ids(pipe.tokenizer, ["a red circle", "zxq"], torch.device("cpu"))
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one process-wide state
    try:
        step = build_step(Accelerator(cpu=True, mixed_precision="bf16"), pipe, TrainConfig(dataset="-", rank=4))
        with torch.no_grad():  # a non-zero B, so that every LoRA parameter has a gradient
            for p in step.params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        layers = [m for model in step.trained for m in model.modules() if isinstance(m, LoraLayer)]
        seen = []
        hook = layers[0].lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        loss, grads = step.loss_and_grads(**inputs)
        hook.remove()
        for layer in layers:
            layer.cast_input_dtype_enabled = True  # peft's default
        loss_peft, grads_peft = step.loss_and_grads(**inputs)
    finally:  # let later tests pick their own precision
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == [torch.bfloat16]
    assert torch.equal(loss, loss_peft)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_peft))


def test_the_step_can_order_the_attention_kernels():
    """bench/train_speed.py --sdpa-too times the step with attention trying its kernels in another order; None,
    what sdlora's step runs with, leaves torch's own order."""
    from torch.nn.attention import SDPBackend

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from train_speed import attention_kernels

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    before = torch._C._get_sdp_priority_order()
    with attention_kernels(order):  # what scaled_dot_product_attention dispatches by
        assert torch._C._get_sdp_priority_order()[:len(order)] == [int(b) for b in order]
    assert torch._C._get_sdp_priority_order() == before
    with attention_kernels(None):
        assert torch._C._get_sdp_priority_order() == before


@pytest.mark.slow
def test_norms_run_in_bf16_and_stay_as_close_to_fp32_as_autocast():
    """Under bf16 autocast the frozen base's group and layer norms run in bf16; CUDA's autocast would run them in fp32
    and cast around each. From the same state, the loss and LoRA gradients are as close to an all-fp32 step's as
    with fp32 norms (within bf16's own rounding): the change costs no accuracy that bf16 had."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.batches import token_ids
    from sdlora.step import build_step

    g = torch.Generator().manual_seed(0)
    inputs = {"mean": tiny_latents(4, g), "std": tiny_latents(4, g).abs() * 0.1,
              "eps": tiny_latents(4, g), "noise": tiny_latents(4, g),
              "timesteps": torch.randint(0, 1000, (4,), generator=g)}

    def step_in(precision):
        pipe = load_base("tiny").pipe
        inputs["ids_0"] = token_ids(pipe.tokenizer, ["a red circle", "zxq", "a blue square", "zxq, a dog"],
                                     torch.device("cpu"))
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one process-wide state
        step = build_step(Accelerator(cpu=True, mixed_precision=precision), pipe, TrainConfig(dataset="-", rank=4))
        with torch.no_grad():  # a non-zero B, so that every LoRA parameter has a gradient
            for p in step.params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        return step

    try:
        step = step_in("bf16")
        norms = [m for model in step.trained for m in model.modules() if "Norm" in type(m).__name__]
        seen = []
        hooks = [m.register_forward_hook(lambda m, args, out: seen.append(out.dtype)) for m in norms]
        loss, grads = step.loss_and_grads(**inputs)
        for hook in hooks:
            hook.remove()
        for m in norms:  # in fp32, as CUDA's autocast runs them (the CPU's runs them in bf16 either way)
            m.forward = functools.partial(_fp32_norm, m)
        loss_fp32_norms, grads_fp32_norms = step.loss_and_grads(**inputs)
        loss_fp32, grads_fp32 = step_in("no").loss_and_grads(**inputs)
    finally:  # let later tests pick their own precision
        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(norms) == 60 and set(seen) == {torch.bfloat16}
    flat = lambda grads: torch.cat([g.flatten().float() for g in grads])  # noqa: E731
    error = lambda grads: ((flat(grads) - flat(grads_fp32)).norm() / flat(grads_fp32).norm()).item()  # noqa: E731
    # Bounds from bf16 itself, not from one machine's rounding: bf16 keeps 8 significant bits (unit roundoff
    # u = 2^-8). The loss, a mean of many squared errors, stays within u of the fp32 loss (relative); the LoRA
    # gradients, after rounding in each of the ~20 bf16 layers they pass back through (a random walk of about
    # sqrt(20) * u / 2), within 8u in relative L2. The bf16 norms must keep the step inside the same bounds that the
    # fp32 norms do; which of the two lands closer differs from CPU to CPU (MKL's kernels round differently).
    u = 2.0**-8
    for loss_of, grads_of in ((loss, grads), (loss_fp32_norms, grads_fp32_norms)):
        assert abs(loss_of.item() - loss_fp32.item()) < u * abs(loss_fp32.item())
        assert 0 < error(grads_of) < 8 * u


def _fp32_norm(m, x):
    f = torch.nn.functional
    if isinstance(m, torch.nn.GroupNorm):
        return f.group_norm(x.float(), m.num_groups, m.weight.float(), m.bias.float(), m.eps)
    return f.layer_norm(x.float(), m.normalized_shape, m.weight.float(), m.bias.float(), m.eps)


@pytest.mark.slow
def test_a_frozen_text_encoder_with_shuffled_tags_encodes_each_steps_captions(tmp_path):
    """Shuffled tags change the captions every step, so they cannot be cached: the frozen text encoder encodes each
    step's captions, and only the UNet's adapter is trained and saved."""
    from sdlora.train import train

    data = draw_dataset(tmp_path / "tags", n=4)
    run = tmp_path / "run"
    train(small_config(data, steps=4, train_text_encoder=False, shuffle_tags=True, sample_every=100, save_every=100),
          run, progress_bar=False)
    assert next(e for e in read_events(run) if e["type"] == "done")["step"] == 4
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_the_final_check_takes_a_preloaded_base(trained_run):
    from sdlora.export import verify
    from sdlora.models import load_base

    path = trained_run / "lora.safetensors"
    assert verify(path, "tiny", base=load_base("tiny")) == verify(path, "tiny")


@pytest.mark.slow
def test_samples_that_run_out_of_memory_fall_back_then_skip(tmp_path, dataset_dir, monkeypatch):
    """Out of memory while sampling (on a GPU the step's CUDA graphs keep their memory): the prompts are drawn one at a
    time with a tiled decode from then on; a round that still does not fit is skipped; training finishes either way."""
    from diffusers import StableDiffusionPipeline

    from sdlora.train import train

    real = StableDiffusionPipeline.__call__
    calls = []

    def tight(self, prompt, *args, **kwargs):  # two prompts never fit; after five calls nothing does
        calls.append(len(prompt))
        if len(prompt) > 1 or len(calls) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", tight)
    run = tmp_path / "tight"
    train(small_config(dataset_dir, steps=20, sample_prompts=["a red circle", "a blue square"]), run, progress_bar=False)
    events = read_events(run)
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert calls[:3] == [2, 1, 1]  # the batched call failed once; every later call draws one prompt
    assert set(calls[1:]) == {1}
    assert sum("drawing them one at a time with a tiled VAE decode" in w for w in warnings) == 1
    assert {e["step"] for e in events if e["type"] == "sample"} == {0, 10}  # 2 + 2 images fit, then 2 more calls
    assert "samples at step 20 skipped: out of memory" in warnings
    assert next(e for e in events if e["type"] == "done")["step"] == 20 and (run / "lora.safetensors").exists()


def test_samples_through_the_unet_replay_path_are_the_same(tmp_path):
    """On a GPU samples are drawn with the UNet's forward replayed as CUDA graphs (sdlora.sampling.SampleGraphs). Its routing
    runs here eagerly: the same images as a plain draw, and the UNet's own forward is back afterwards."""
    from accelerate import Accelerator

    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.rundir import EventLog
    from sdlora.sampling import SampleGraphs, Sampler
    from sdlora.step import build_step

    pipe = load_base("tiny").pipe
    config = TrainConfig(dataset="-", steps=10, resolution=64, sample_steps=4)
    step = build_step(Accelerator(cpu=True), pipe, config)
    with torch.no_grad():  # a LoRA that changes the output
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    graphs = SampleGraphs(pipe.unet, torch.float32, enabled=False)
    calls = []
    real = graphs._forward
    graphs.run.fn = lambda **kw: calls.append(sorted(kw)) or real(**kw)
    images = {}
    for name, state in (("plain", None), ("replay", graphs)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        Sampler(Accelerator(cpu=True), pipe, step.trained, config, ["a red circle", "a blue square"], 64, run_dir,
                EventLog(run_dir), state)(3)
        images[name] = [np.asarray(__import__("PIL.Image").Image.open(run_dir / "samples" / f"step-000003-{i}.png"),
                                   dtype=np.float32) for i in range(2)]
    assert len(calls) == 4 and calls[0] == ["encoder_hidden_states", "sample", "timestep"]  # every UNet call
    for a, b in zip(images["plain"], images["replay"]):
        assert np.abs(a - b).max() == 0
    assert "forward" not in pipe.unet.__dict__


@pytest.mark.slow
def test_uncached_run_with_short_batches_counts_epochs_in_batches(tmp_path):
    """Random crops (latents encoded every step, no cache) and 5 images at batch 4: each epoch is a batch of 4 and a
    short one of 1, so 6 steps are 3 epochs, and every progress event reports a rate of the images trained."""
    from sdlora.train import train

    data = draw_dataset(tmp_path / "five", n=5)
    run = tmp_path / "run"
    train(small_config(data, steps=6, batch_size=4, random_crop=True, sample_every=100, save_every=100), run,
          progress_bar=False)
    events = read_events(run)
    assert next(e for e in events if e["type"] == "start")["epochs"] == 3.0
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 6
    assert all(isinstance(e["images_per_s"], float) and e["images_per_s"] > 0 for e in progress)


def test_captions_are_encoded_before_the_pictures(tmp_path):
    """The text encoders finish before the VAE encodes a picture, so a run can take those the step never needs
    (SD3.5's T5, 4.7B parameters) off the GPU first: caching then peaks at the larger of the two, not their sum."""
    from accelerate import Accelerator

    from sdlora import families
    from sdlora.batches import Batches
    from sdlora.models import load_base
    from sdlora.objectives import DDPM

    pipe = load_base("tiny").pipe
    encoded, encode = [], pipe.vae.encode
    pipe.vae.encode = lambda *a, **k: (encoded.append(1), encode(*a, **k))[1]
    data_dir = draw_dataset(tmp_path / "data", n=2, size=64)
    records = ds.ingest(data_dir, trigger="zxq").records
    config = small_config(data_dir, batch_size=2, train_text_encoder=False)
    seen = []
    batches = Batches(config, records, [(64, 64)] * 2, pipe, families.detect(pipe), DDPM(pipe.scheduler.config),
                      Accelerator(cpu=True), texts_cached=lambda: seen.append(len(encoded)))
    assert seen == [0] and len(encoded) >= 2 and batches.texts and batches.latents


def test_out_of_memory_while_caching_says_where_and_what_was_asked(tmp_path, dataset_dir, monkeypatch):
    """Out of memory outside the samples ends the run with one line naming the stage, a hint, and torch's own account
    of the allocation in the event's detail, beside what each model held on the GPU."""
    from sdlora import batches
    from sdlora.errors import UserError
    from sdlora.train import train

    def tight(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.50 GiB free. "
                                     "Of the allocated memory 10 GiB is allocated by PyTorch")

    monkeypatch.setattr(batches, "cache_latents", tight)
    run = tmp_path / "oom"
    with pytest.raises(UserError) as raised:
        train(small_config(dataset_dir, steps=4), run, progress_bar=False)
    assert raised.value.message == "out of memory while caching latents and text embeddings"
    error = next(e for e in read_events(run) if e["type"] == "error")
    assert "lower batch_size or resolution" in error["hint"]
    assert error["detail"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.50 GiB free")
