"""Bad input a user can give: settings of the wrong type, a name that would reach outside its folder, a command that
failed and is typed again corrected, a file that is not a plain LoRA; each gets one line and loses nothing saved."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from conftest import draw_dataset
from sdlora import workspace as ws
from sdlora.card import model_card
from sdlora.cli import main
from sdlora.dataset import NO_TRIGGER, common_first_word
from sdlora.errors import UserError


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_setting_of_the_wrong_type_names_the_setting(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "x", "steps": "ten"}))
    assert main(["train", "--run-dir", str(run)]) == 2
    assert error_lines(capsys) == ["sdlora: error: setting steps = 'ten': must be a whole number "
                                   "(hint: fix steps in the config file)"]
    (run / "config.json").write_text("[1, 2]")
    assert main(["train", "--run-dir", str(run)]) == 2
    assert error_lines(capsys) == [f"sdlora: error: {run / 'config.json'} does not hold settings "
                                   '(hint: write one JSON object, e.g. {"steps": 600})']


def test_whole_numbers_and_booleans_are_checked_as_such():
    from sdlora.config import TrainConfig

    assert TrainConfig.from_dict({"unet_lr": 1, "steps": 600.0}).steps == 600  # JSON may write either
    for values, kind in [({"flip": 1}, "true or false"), ({"steps": True}, "a whole number"),
                         ({"steps": 2.5}, "a whole number"), ({"sample_prompts": "a cat"}, "a list"),
                         ({"trigger": 5}, "text")]:
        with pytest.raises(UserError, match=f"must be {kind}"):
            TrainConfig.from_dict(values)


@pytest.mark.slow
def test_a_command_that_failed_before_training_can_be_typed_again(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    assert main(["train", str(data), "--out", str(run), "--quiet"]) == 2  # no pictures in it yet
    assert "error" in (run / "events.jsonl").read_text()  # the failed command left its folder
    draw_dataset(data, n=2, size=32)
    assert main(["train", str(data), "--out", str(run), "--steps", "1", "--batch-size", "1",
                 "--sample-every", "0", "--save-every", "0", "--rank", "2"]) == 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert "error" not in kinds and "start" in kinds and kinds[-1] == "done"  # the failed attempt's events are gone
    # no --trigger, and captions ("a red circle on a blue background") that start with none: said once
    assert [e["message"] for e in events if e["type"] == "warning"].count(NO_TRIGGER) == 1
    # what the run said about the pictures, and what its file records
    assert "2 pictures in 1 size bucket(s): 2 at 64x64; each scaled to cover its bucket and centre cropped; " \
           "1 steps of 1 = 0.5 epochs" in capsys.readouterr().out
    from sdlora.info import describe

    info = describe(run / "lora.safetensors")
    assert info["settings"]["epochs"] == "0.5" and "epoch" not in info["settings"]  # not kohya's "1"
    assert info["settings"]["mixed precision"] == "no"  # what ran on the CPU, not the setting "auto"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "lora.safetensors").stat().st_mode) == 0o666 & ~umask  # as any file made here
    # a run that trained is never replaced by a new command
    assert main(["train", str(data), "--out", str(run), "--quiet", "--steps", "1"]) == 2
    assert error_lines(capsys)[-1].startswith(f"sdlora: error: {run} already holds a run")
    assert (run / "lora.safetensors").is_file()


def test_names_never_reach_the_workspace_or_a_top_folder(tmp_path):
    for top in ("datasets/a", "runs/r", "exports/e"):
        (tmp_path / top).mkdir(parents=True)
    (tmp_path / "datasets" / "up").symlink_to(tmp_path / "runs")
    for parts in [("exports", ".."), ("exports", "."), ("exports", ""), ("exports", "../datasets"),
                  ("exports", "/etc"), ("datasets", "up"), ("datasets", "up", "r"), ("datasets", "a/../../runs")]:
        with pytest.raises(UserError, match="outside the workspace"):
            ws.inside(tmp_path, *parts)
    for name in ("..", ".", "", "../datasets", "a/b"):
        with pytest.raises(UserError, match="not a valid"):
            ws.export_dir(tmp_path, name)
    assert ws.inside(tmp_path, "datasets", "a/b.png") == tmp_path.resolve() / "datasets" / "a" / "b.png"
    assert ws.export_dir(tmp_path, "e") == tmp_path.resolve() / "exports" / "e"


def test_an_unreadable_run_config_is_named_and_the_rest_still_lists(tmp_path):
    for name, text in (("good", "{}"), ("broken", "{ not json")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text(text)
    assert set(ws.run_names(tmp_path)) == {"good", "broken"}
    assert ws.run_config(tmp_path, "good") == {}
    with pytest.raises(UserError, match="run broken has an unreadable config.json"):
        ws.run_config(tmp_path, "broken")


def test_generate_says_what_a_lycoris_file_it_does_not_read_is(tmp_path, capsys):
    """LoHa and LoKr files preview (tests/test_lycoris.py); a LoHa with Tucker factors (LyCORIS's use_tucker) does not."""
    loha = tmp_path / "style-loha.safetensors"
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{name}.hada_w1_a": torch.zeros(4, 32), f"{name}.hada_w1_b": torch.zeros(4, 32),
               f"{name}.hada_t1": torch.zeros(4, 4, 3, 3), f"{name}.hada_w2_a": torch.zeros(4, 32),
               f"{name}.hada_w2_b": torch.zeros(4, 32), f"{name}.hada_t2": torch.zeros(4, 4, 3, 3),
               f"{name}.alpha": torch.tensor(4.0)}, str(loha))
    assert main(["generate", "a cat", "--lora", str(loha), "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("sdlora: error: style-loha.safetensors is a LyCORIS LoHa with Tucker factors file, which "
                           f"sdlora does not read (key {name}")
    assert not (tmp_path / "x.png").exists()


def test_generate_at_a_size_the_model_cannot_draw_says_which_sizes_it_can(tmp_path, capsys):
    assert main(["generate", "a cat", "--base", "tiny", "--size", "100", "--steps", "1", "--out",
                 str(tmp_path / "x.png")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("sdlora: error: the SD1.x pipeline cannot draw this: `height` and `width` have to be "
                           "divisible by 8") and "multiples of 32 px, near the model's own size (64 px)" in line, line
    assert not (tmp_path / "x.png").exists()


def test_the_model_card_leaves_out_the_learning_rate_of_a_text_encoder_that_did_not_train():
    def card(trained: bool) -> str:
        config = {"base": "tiny", "steps": 10, "unet_lr": 5e-4, "text_encoder_lr": 1e-4,
                  "train_text_encoder": trained}
        return model_card(title="t", trigger="zq", description="", config=config, file_name="t.safetensors",
                          step=10, samples=[])

    assert "| text encoder learning rate | 0.0001 |" in card(True)
    assert "text encoder learning rate" not in card(False) and "| text encoder trained | False |" in card(False)


def test_every_command_line_option_says_what_it_does():
    from sdlora.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"sdlora {name}: {action.option_strings or action.dest} has no help"


def test_a_trigger_is_found_at_the_start_of_the_captions():
    assert common_first_word(["zqchar, a cat", "zqchar, a dog", "ZQchar, red", "zqchar, blue", "a picture"]) == "zqchar"
    assert common_first_word(["a red circle", "a blue square"]) is None  # sentences: no shared first tag
    assert common_first_word(["zq, a", "zq, b", "other, c"]) is None  # under 80%
