"""Logging to tensorboard through accelerate's trackers: the loss, the learning rate and the samples reach the
tracker's files, beside the events file the app reads."""

import pytest

from conftest import draw_dataset, need, small_config
from sdlora.rundir import read_events


@pytest.mark.slow  # trains the tiny model
def test_a_run_logs_loss_lr_and_samples_to_tensorboard(tmp_path):
    need("tensorboard", 'pip install tensorboard (or pip install -e ".[test-extra]")')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdlora.train import train

    run = tmp_path / "run"
    train(small_config(draw_dataset(tmp_path / "shapes", n=4), steps=4, sample_every=2, save_every=100,
                       log_with="tensorboard"), run, progress_bar=False)
    assert any(e["type"] == "done" for e in read_events(run))  # the events file is written as always
    files = list((run / "logs").rglob("events.out.tfevents.*"))
    assert files, "no tensorboard event file under the run's logs/"
    scalars, images = {}, {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars.update({tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]})
        images.update({tag: acc.Images(tag) for tag in acc.Tags()["images"]})
    progress = {e["step"]: e["loss"] for e in read_events(run) if e["type"] == "progress"}
    assert {s.step: pytest.approx(s.value, rel=1e-5) for s in scalars["loss"]} == progress
    assert {"lr", "loss_ema"} <= set(scalars)
    assert {"samples/0", "samples/1"} <= set(images)
    assert sorted({i.step for i in images["samples/0"]}) == [0, 2, 4]


def test_logging_to_a_package_that_is_not_there_is_one_line(monkeypatch):
    import builtins

    from sdlora.config import TrainConfig
    from sdlora.errors import UserError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real(name, *a, **k))
    with pytest.raises(UserError, match="log_with wandb needs the wandb package") as e:
        TrainConfig(dataset="d", log_with="wandb").validate()
    assert e.value.hint == "pip install wandb, or leave --log-with out"
