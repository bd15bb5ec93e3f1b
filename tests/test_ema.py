"""EMA of the adapter weights: the average it keeps, the *-ema.safetensors file beside each save (checked like the
rest), and a resumed run that goes on averaging exactly as an uninterrupted one."""

import pytest
import torch

from conftest import draw_dataset, small_config
from sdlora.rundir import read_events


def test_the_average_follows_its_formula_and_swapping_it_in_and_out_is_exact():
    from sdlora.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, start=1, every=2)
    seen = []
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update(step)
        seen.append(ema.shadow[0][0].item())
    # step 1 (<= start) copies; step 2 averages; step 3 is skipped (every 2); step 4 averages; step 5 skipped
    assert seen == [1.0, 1.5, 1.5, 4.75, 4.75]
    with ema.swapped():
        assert p[0].item() == 4.75
    assert p[0].item() == 16.0


@pytest.mark.slow  # trains the tiny model
def test_a_run_with_ema_saves_and_checks_an_ema_twin_of_each_file_and_resumes_it(tmp_path):
    from sdlora.lora import read_lora
    from sdlora.train import train

    data = draw_dataset(tmp_path / "shapes", n=4)
    kw = dict(sample_every=100, save_every=3, ema_decay=0.5, ema_start=1)
    train(small_config(data, steps=6, **kw), tmp_path / "full", progress_bar=False)
    full = tmp_path / "full"
    assert (full / "lora-step-000003-ema.safetensors").is_file() and (full / "lora-ema.safetensors").is_file()
    verified = [e for e in read_events(full) if e["type"] == "verify"]
    assert [e["path"].rsplit("/", 1)[-1] for e in verified] == ["lora.safetensors", "lora-ema.safetensors"]
    assert all(e["ok"] for e in verified)
    trained, _ = read_lora(full / "lora.safetensors")
    averaged, meta = read_lora(full / "lora-ema.safetensors")
    assert trained.keys() == averaged.keys() and meta["sdlora_ema_decay"] == "0.5"
    assert meta["modelspec.title"].endswith("(EMA)")
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained if k.endswith("lora_up.weight"))

    train(small_config(data, steps=3, **kw), tmp_path / "split", progress_bar=False)
    train(small_config(data, steps=6, **kw), tmp_path / "split", resume=True, progress_bar=False)
    resumed, _ = read_lora(tmp_path / "split" / "lora-ema.safetensors")
    assert max((resumed[k] - averaged[k]).abs().max().item() for k in averaged) < 1e-5


def test_ema_settings_are_checked():
    from sdlora.config import TrainConfig
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="ema_decay = 1.0: must be 0"):
        TrainConfig(dataset="d", ema_decay=1.0).validate()
