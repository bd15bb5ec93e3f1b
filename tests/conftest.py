"""Shared fixtures: small datasets drawn on the fly and one trained run on the embedded tiny model."""

import os
import random

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import importlib
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# .ci/run installs every optional package and sets CI=true: there a test that would skip for want of one fails.
IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, install: str):
    """Import the optional package `module` for a test; skip (fail under CI=true) with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"needs {module}: {install}")


def need_chromium() -> str:
    """The path of Debian's chromium for browser tests; skip (fail under CI=true) where it is not installed."""
    if not os.path.exists(CHROMIUM):
        _missing("needs Debian's chromium: apt-get install -y chromium")
    return CHROMIUM

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 220, 40)}


def draw_dataset(folder, n=8, seed=0, size=96, captions=True):
    """n images of a coloured circle or square on a plain background, with sentence captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        color, bg = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(["circle", "square"])
        im = Image.new("RGB", (size, size), COLORS[bg])
        box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLORS[color])
        im.save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"a {color} {shape} on a {bg} background")
    return folder


def render_sample(pipe, event):
    """Redraw a `sample` event with a plain diffusers pipeline: the reproducibility contract's other side."""
    import diffusers
    import numpy as np
    import torch

    import inspect

    pipe.scheduler = getattr(diffusers, event["scheduler"]).from_config(pipe.scheduler.config,
                                                                        **event.get("scheduler_config", {}))
    # StableDiffusion3Pipeline has no guidance_rescale (the events record 0.0 for it)
    rescale = {"guidance_rescale": event.get("guidance_rescale", 0.0)} \
        if "guidance_rescale" in inspect.signature(type(pipe).__call__).parameters else {}
    return np.asarray(pipe(event["prompt"], negative_prompt=event["negative_prompt"] or None,
                           num_inference_steps=event["steps"], guidance_scale=event["guidance_scale"], **rescale,
                           width=event["width"], height=event["height"],
                           generator=torch.Generator("cpu").manual_seed(event["seed"])).images[0], dtype=np.float32)


def small_config(dataset, **kw):
    from sdlora.config import TrainConfig

    values = dict(dataset=str(dataset), base="tiny", steps=20, batch_size=2, rank=4, alpha=2.0, trigger="zxq",
                  sample_every=10, sample_steps=6, save_every=10, lr_scheduler="constant", warmup_fraction=0.0,
                  unet_lr=1e-3, text_encoder_lr=5e-4, train_text_encoder=True)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    return draw_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, dataset_dir):
    """20 steps, rank 4 / alpha 2 (alpha != rank), text-encoder LoRA on: the run most tests look at."""
    from sdlora.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    train(small_config(dataset_dir), run_dir, progress_bar=False)
    return run_dir


@pytest.fixture()
def offline(monkeypatch):
    """Within the test, any network connection fails the test: what it loads must be on disk."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def tiny_latents(n: int, generator=None):
    """Random latents of `n` pictures shaped for the embedded tiny model's UNet (its channels and sample size)."""
    import json

    import torch
    from sdlora.tiny import MODEL_DIR

    config = json.loads((Path(MODEL_DIR) / "unet" / "config.json").read_text())
    size = config["sample_size"]
    return torch.randn(n, config["in_channels"], size, size, generator=generator)


def module_names(keys) -> set[str]:
    """The modules a LoRA file's keys belong to (a key's last two dotted parts dropped, or one for `.alpha`)."""
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}


def assert_trains_on_an_fp8_base(folder, tmp_path) -> None:
    """Three CLI steps on the base `folder` stored in fp8 (--base-precision fp8): the transformer's and T5's weights
    are fp8 and its LoRA file loads completely onto the unquantized base, on the CPU."""
    import numpy as np

    from sdlora.cli import main
    from sdlora.rundir import read_events

    data = draw_dataset(tmp_path / "data", n=4, size=80)
    run = tmp_path / "fp8"
    assert main(["train", str(data), "--base", str(folder), "--out", str(run), "--base-precision", "fp8",
                 "--resolution", "64", "--steps", "3", "--batch-size", "2", "--rank", "4", "--trigger", "zxq",
                 "--sample-every", "3", "--save-every", "3", "--sample-steps", "3", "--quiet"]) == 0
    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    assert start["base_storage"].startswith("base weights stored as fp8") and "transformer" in start["base_storage"]
    assert "T5 stored in fp8" in start["base_storage"]  # the frozen T5 too: 4.7 GB on the GPU, not 9.5
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "progress")
    verify = next(e for e in events if e["type"] == "verify")
    assert verify["ok"] and verify["keys_consumed"] == verify["keys_written"] and verify["strength0_max_diff"] == 0
    assert len(list((run / "samples").glob("step-000003-*.png"))) == 2


def assert_resume_matches_an_uninterrupted_run(folder, tmp_path) -> None:
    """On the base `folder`: 4 steps in one go, and 2 steps then resumed to 4 (checkpoint, optimizer, each picture's
    noise and timestep or sigma, caption dropout) give the same LoRA."""
    from sdlora.lora import read_lora
    from sdlora.rundir import read_events
    from sdlora.train import train

    data = draw_dataset(tmp_path / "data", n=4, size=80)
    kw = dict(base=str(folder), resolution=64, sample_every=1000, save_every=2, caption_dropout=0.3, unet_lr=1e-2,
              sample_steps=3)
    train(small_config(data, steps=4, **kw), tmp_path / "full", progress_bar=False)
    train(small_config(data, steps=2, **kw), tmp_path / "split", progress_bar=False)
    train(small_config(data, steps=4, **kw), tmp_path / "split", resume=True, progress_bar=False)
    assert any(e["type"] == "warning" and "resumed from step-000002" in e["message"]
               for e in read_events(tmp_path / "split"))
    a, _ = read_lora(tmp_path / "full" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "split" / "lora.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def measured_again(run, tmp_path) -> dict:
    """The last `eval` event of `sdlora eval` on a copy of `run`: its final save measured from the file alone."""
    from sdlora.cli import main
    from sdlora.rundir import read_events

    copy = tmp_path / "measured-again"
    shutil.copytree(run, copy)
    assert main(["eval", str(copy)]) == 0
    return [e for e in read_events(copy) if e["type"] == "eval" and e.get("source") == "sdlora eval"][-1]


def assert_run_verified_and_measured(run, tmp_path, family: str) -> tuple[list, set, dict]:
    """A three-step CLI run on a small `family` model: 64 px, finite losses, the file checked through diffusers' loader
    (every key consumed, strength 0 = base), the measures positive and the same when `sdlora eval` measures the file
    again, keys in diffusers' lora_A/lora_B names. Gives the events, the file's modules and its metadata."""
    import numpy as np
    from safetensors import safe_open

    from sdlora.rundir import read_events

    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    assert start["family"] == family and start["resolution"] == 64
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "progress")
    verify = next(e for e in events if e["type"] == "verify")
    assert verify["ok"] and verify["keys_consumed"] == verify["keys_written"] and verify["strength0_max_diff"] == 0
    assert verify["file_check"]["ok"]
    measured = [e for e in events if e["type"] == "eval"][-1]
    assert measured["learned"] > 0 and np.isfinite(measured["learned"]) and np.isfinite(measured["bleed"])
    assert any(e["type"] == "recommend" for e in events)
    again = measured_again(run, tmp_path)
    assert (again["learned"], again["bleed"]) == pytest.approx((measured["learned"], measured["bleed"]), rel=1e-3)
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    return events, module_names(keys), meta


def assert_app_lists(tmp_path, folder, single, resolution: int, labels: tuple[str, str]) -> None:
    """A base model's diffusers folder and single file, put in a models folder, are listed by the app under their
    families' `labels` and resolve to the family's `resolution`; picking either on the Train tab offers its family's
    presets and picks the one made for it."""
    from types import SimpleNamespace

    from sdlora.app import tab_train
    from sdlora.check import base_resolution
    from sdlora.config import FAMILY_PRESET, PRESET_FAMILIES
    from sdlora.workspace import base_models

    models = tmp_path / "models"
    shutil.copytree(folder, models / Path(folder).name)
    shutil.copy(single, models / Path(single).name)
    listed = {value: label for label, value in base_models(models)}
    assert listed[Path(folder).name] == f"{Path(folder).name} (folder, {labels[0]})"
    assert listed[Path(single).name] == f"{Path(single).name} ({labels[1]})"
    assert base_resolution(str(models / Path(folder).name)) == base_resolution(str(models / Path(single).name)) \
        == resolution
    for value, label in zip((Path(folder).name, Path(single).name), labels):
        shown = tab_train.choose_base(SimpleNamespace(models=models), {"base": value, "preset": "quick"})
        offered = {p for _, p in shown["preset"].choices}
        assert shown["preset"].value == FAMILY_PRESET[label] and shown["info"] == \
            f"{label} base: preset {dict((p, t) for t, p in tab_train.PRESET_CHOICES)[FAMILY_PRESET[label]]} picked"
        assert shown["unet_lr"] == 1e-4 and shown["resolution"] == 1024
        assert offered == {"quick", "character", "style"} | {p for p, made_for in PRESET_FAMILIES.items()
                                                             if label in made_for}
    # the single file lacks what the shipped configs cannot give (SD3.5's T5 tokenizer, FLUX.1's VAE and text
    # encoders): the plan says where to give it, until Base config is filled in
    note = tab_train.single_file_note(str(models / Path(single).name), "")
    assert note.startswith(f"This {labels[1]} file lacks its ") and "set Base config to a diffusers" in note
    assert tab_train.single_file_note(str(models / Path(single).name), str(folder)) == ""
    assert tab_train.single_file_note(str(models / Path(folder).name), "") == ""
