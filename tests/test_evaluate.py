"""What a run says about its saves: the measures of each save (the same from the run's own models and from its files),
the save and strength it recommends and why, the held-out split, and where the user reads it."""

import json
import math

import pytest
from safetensors import safe_open

from sdlora import adapters, examples
from sdlora.cli import main
from sdlora.evaluate import Measure, recommend, split, without_trigger
from sdlora.rundir import read_events


def measure(step, learned, bleed=0.1, heldout=None, train=None) -> Measure:
    """A save whose learned rises with strength up to 1 and then falls, by `learned` at 1."""
    shape = {0.5: 0.7, 1.0: 1.0, 1.5: 0.8}
    return Measure(step, {s: {"learned": learned * k, "bleed": bleed * s} for s, k in shape.items()}, heldout, train)


def test_the_recommendation_avoids_overfit_and_bleed():
    name = lambda step: f"lora-step-{step:06d}"  # noqa: E731
    # held-out loss lowest at step 200, then rising while the training loss keeps falling: later saves overfit
    saves = [measure(100, 0.10, heldout=1.00, train=1.0), measure(200, 0.20, heldout=0.90, train=0.9),
             measure(300, 0.25, heldout=0.95, train=0.8), measure(400, 0.30, heldout=1.10, train=0.7)]
    best = recommend(saves, name)
    assert (best.step, best.strength) == (200, 1.0) and [m.overfit for m in saves] == [False, False, True, True]
    assert best.reason == "lora-step-000200 at 1: 100% of the best learned, bleed 10%; later saves overfit"
    # no held-out pictures: of the saves within 90% of the best learned, the one that bleeds least
    saves = [measure(100, 0.10, bleed=0.05), measure(200, 0.19, bleed=0.10), measure(300, 0.20, bleed=0.40)]
    best = recommend(saves, name)
    assert best.step == 200 and best.reason.endswith("; later saves bleed more") and best.learned_share == \
        pytest.approx(0.95)
    # a strength within 95% of a save's best is as good: the lowest such is suggested
    flat = Measure(1, {0.5: {"learned": 0.96, "bleed": 0}, 1.0: {"learned": 1.0, "bleed": 0}})
    assert flat.suggested() == 0.5
    # a save that has lowered the loss at no strength yet (early in a run): the strength that raises it least
    early = Measure(1, {0.5: {"learned": -0.01, "bleed": 0}, 1.0: {"learned": -0.03, "bleed": 0}})
    assert early.suggested() == 0.5 and recommend([early], name).strength == 0.5


def test_the_split_and_the_trigger():
    assert split(list(range(29)), -1, 0) == (list(range(29)), [])  # small datasets train on every picture
    train, held = split(list(range(40)), -1, 0)
    assert len(held) == 2 and sorted(train + held) == list(range(40)) and split(list(range(40)), -1, 0)[1] == held
    assert len(split(list(range(6)), 5, 0)[1]) == 2  # at least 4 pictures stay to train on
    assert without_trigger("zxq, a red circle", "zxq") == "a red circle"
    assert without_trigger("a zxq-style red circle", "zxq-style") == "a red circle"
    assert without_trigger("zxq", "zxq") == "a picture"


@pytest.mark.slow
def test_a_run_says_which_save_and_strength_to_use(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "example:character", "--base", "tiny", "--out", str(run), "--steps", "12",
                 "--save-every", "6", "--sample-every", "100", "--batch-size", "2"]) == 0
    events = read_events(run)
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [6, 12] and evals[0]["on"] == "training pictures"
    assert all(e["learned"] > 0 for e in evals)  # the LoRA lowers the loss on its pictures
    assert [r["strength"] for r in evals[0]["strengths"]] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    (best,) = [e for e in events if e["type"] == "recommend"]
    assert best["reason"].startswith(("lora-step-000006 at ", "lora (the final save) at "))
    with safe_open(run / "lora.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["sdlora_recommendation"] == best["reason"]
    assert float(meta["sdlora_suggested_strength"]) == evals[-1]["suggested_strength"]
    assert f"use: {best['reason']}" in capsys.readouterr().out

    # measured again from the files alone: the same numbers, the same advice
    assert main(["eval", str(run)]) == 0
    assert f"use: {best['reason']}" in capsys.readouterr().out
    again = [e for e in read_events(run) if e["type"] == "eval" and e.get("source") == "sdlora eval"]
    for a, b in zip(evals, again):
        assert [r["learned"] for r in a["strengths"]] == pytest.approx([r["learned"] for r in b["strengths"]],
                                                                       rel=1e-3, abs=1e-5)
        assert a["bleed"] == pytest.approx(b["bleed"], rel=1e-3)
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_evaluation_can_be_turned_off(tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(examples.path("style")), "--base", "tiny", "--out", str(run), "--steps", "2",
                 "--sample-every", "100", "--batch-size", "1", "--no-evaluate", "--quiet"]) == 0
    assert not any(e["type"] in ("eval", "recommend") for e in read_events(run))
    assert json.loads((run / "config.json").read_text())["evaluate"] is False


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(adapters.TYPES))
def test_every_adapter_type_is_measured_in_the_run_and_from_its_file(tmp_path, dataset_dir, adapter):
    from conftest import small_config
    from sdlora.train import train

    run = tmp_path / adapter
    train(small_config(dataset_dir, steps=3, adapter=adapter, sample_every=100, save_every=100, unet_lr=3e-3),
          run, progress_bar=False)
    measured = [e for e in read_events(run) if e["type"] == "eval"][-1]
    numbers = [r[k] for r in measured["strengths"] for k in ("learned", "bleed")]
    assert len(numbers) == 12 and all(math.isfinite(n) for n in numbers) and measured["learned"] > 0
    assert any(e["type"] == "recommend" for e in read_events(run))
    # measured again from the file alone (LoHa, LoKr and DoRA put into the base's weights): the same numbers
    assert main(["eval", str(run)]) == 0
    again = [e for e in read_events(run) if e["type"] == "eval" and e.get("source") == "sdlora eval"][-1]
    assert [r["learned"] for r in again["strengths"]] == pytest.approx([r["learned"] for r in measured["strengths"]],
                                                                       rel=1e-3, abs=1e-5)
    assert again["bleed"] == pytest.approx(measured["bleed"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_a_text_encoder_without_adapters_encodes_each_prompt_once(tmp_path, monkeypatch, train_text_encoder):
    """Its outputs do not depend on the strength, so measuring more saves and strengths does not call it again (SD3's
    and FLUX.1's T5 is such an encoder); one that carries adapters is called at every strength."""
    from sdlora import models

    run = tmp_path / "run"
    flag = "--train-text-encoder" if train_text_encoder else "--no-train-text-encoder"
    assert main(["train", str(examples.path("style")), "--base", "tiny", "--out", str(run), "--steps", "2",
                 "--save-every", "1", "--sample-every", "100", "--batch-size", "1", "--no-evaluate", flag,
                 "--quiet"]) == 0
    calls = []
    load_base = models.load_base

    def counting(*args, **kwargs):
        base = load_base(*args, **kwargs)
        base.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
        return base
    monkeypatch.setattr(models, "load_base", counting)
    assert main(["eval", str(run)]) == 0
    saves, strengths = 2, 6
    assert len(calls) == (1 + saves * strengths if train_text_encoder else 1)
