"""Data-parallel training: two processes through `accelerate launch` (gloo on the CPU) equal one process with
the same global batch."""

import subprocess
import sys

import pytest

from conftest import small_config
from sdlora.lora import read_lora
from sdlora.launch import launch_args
from sdlora.rundir import read_events

pytestmark = pytest.mark.slow  # each test starts several training processes


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, dataset_dir):
    from sdlora.train import train

    settings = dict(steps=6, sample_every=1000, save_every=3, rank=4, alpha=2.0, caption_dropout=0.2, flip=True)
    train(small_config(dataset_dir, batch_size=4, **settings), tmp_path / "one", progress_bar=False)

    two = tmp_path / "two"
    flags = ["--steps", "6", "--sample-every", "1000", "--save-every", "3", "--rank", "4", "--alpha", "2",
             "--caption-dropout", "0.2", "--flip", "--batch-size", "2", "--trigger", "zxq", "--lr-scheduler", "constant",
             "--warmup-fraction", "0", "--unet-lr", "1e-3", "--text-encoder-lr", "5e-4", "--sample-steps", "6"]
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch_args(2), "-m", "sdlora", "train",
                          str(dataset_dir), "--base", "tiny", "--out", str(two), "--quiet", *flags],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]

    events = read_events(two)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 1 and starts[0]["batch_per_gpu"] == 2 and starts[0]["global_batch"] == 4
    assert [e["type"] for e in events].count("done") == 1
    # the main process measures each save once (the measures are forwards only: the other process goes on)
    assert [e["step"] for e in events if e["type"] == "eval"] == [3, 6]
    assert [e["type"] for e in events].count("recommend") == 1
    assert sorted(p.name for p in two.glob("lora*.safetensors")) == ["lora-step-000003.safetensors", "lora.safetensors"]
    a, _ = read_lora(tmp_path / "one" / "lora.safetensors")
    b, _ = read_lora(two / "lora.safetensors")
    assert a.keys() == b.keys()
    # The same updates; only the order of float sums differs (2 x 2 images summed across processes against 4 in one),
    # which changes each gradient by a few fp32 roundoffs. Adam divides every element's gradient by its own running
    # RMS, so an element whose gradient sits near zero can move by a visible part of a step either way (one of them
    # ends 0.7% apart); a single element's worst case says nothing about the run. Per tensor, in L2, the difference
    # stays at the roundoff level amplified by those few elements: far below 1e-3 of the tensor.
    worst = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a if not k.endswith(".alpha"))
    assert worst < 1e-3, worst
    loss_one = [e for e in read_events(tmp_path / "one") if e["type"] == "progress"][-1]["loss"]
    loss_two = [e for e in events if e["type"] == "progress"][-1]["loss"]
    assert abs(loss_one - loss_two) < 1e-4 * abs(loss_one)


def test_resume_on_more_processes_says_what_changed(tmp_path, dataset_dir):
    from sdlora.train import train

    run = tmp_path / "grow"
    flags = ["--batch-size", "2", "--sample-every", "1000", "--save-every", "2", "--sample-steps", "4", "--quiet"]
    train(small_config(dataset_dir, steps=2, sample_every=1000, save_every=2, sample_steps=4), run, progress_bar=False)
    out = subprocess.run([sys.executable, "-m", "sdlora", "train", str(dataset_dir), "--base", "tiny", "--out", str(run),
                          "--steps", "4", "--resume", "--gpus", "2", "--trigger", "zxq", *flags],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    events = read_events(run)
    assert any("saved with 1 process(es), now 2: the global batch is 4 images instead of 2" in e.get("message", "")
               for e in events)
    assert events[-1]["type"] == "done" and events[-1]["step"] == 4


def test_two_processes_train_flux_as_one(tmp_path):
    """Flow matching (FLUX.1 dev: sigmas per picture, guidance embedding, T5 frozen and its embeddings cached) over
    two processes gives the one-process run's LoRA."""
    from conftest import draw_dataset
    from test_families_flux import build_flux

    base = tmp_path / "flux"
    build_flux().save_pretrained(str(base))
    data = draw_dataset(tmp_path / "data", n=4, size=80)
    flags = ["--base", str(base), "--resolution", "64", "--steps", "3", "--rank", "4", "--alpha", "2",
             "--trigger", "zxq", "--sample-every", "1000", "--save-every", "1000", "--sample-steps", "3",
             "--lr-scheduler", "constant", "--warmup-fraction", "0", "--unet-lr", "1e-3", "--no-evaluate", "--quiet"]
    runs = {}
    for processes, batch in ((1, "4"), (2, "2")):
        runs[processes] = tmp_path / f"on{processes}"
        launcher = ["-m", "accelerate.commands.launch", *launch_args(processes)] if processes > 1 else []
        out = subprocess.run([sys.executable, *launcher, "-m", "sdlora", "train", str(data), "--out",
                              str(runs[processes]), "--batch-size", batch, *flags],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    start = next(e for e in read_events(runs[2]) if e["type"] == "start")
    assert start["family"] == "flux.1-dev" and start["global_batch"] == 4
    a, _ = read_lora(runs[1] / "lora.safetensors")
    b, _ = read_lora(runs[2] / "lora.safetensors")
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)  # as above: fp32 sums in another order
    assert worst < 1e-3, worst
