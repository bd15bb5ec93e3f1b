"""Editing tags across captions: what each edit does to a caption, the preview that writes nothing, the command line
and the Pictures tab's "Edit tags" panel."""

import pytest

from conftest import draw_dataset
from sdlora import workspace as ws
from sdlora.app import tab_pictures
from sdlora.app.context import Context
from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.tags import TagEdit, frequencies, preview


def test_remove_replace_and_add_tags():
    edit = TagEdit(remove=("solo",), replace=(("blue_hair", "blue hair"), ("1girl", "1woman")),
                   add=("masterpiece", "Smile"), at="start", trigger="zxq")
    # case, spaces and "_" do not matter when matching; a replacement already there is not repeated; the trigger stays
    assert edit.apply("zxq, 1girl,  Blue_Hair, SOLO, smile, blue hair") == "zxq, masterpiece, 1woman, blue hair, smile"
    assert TagEdit(add=("a",), at="start", trigger="zxq").apply("b, zxq") == "a, b, zxq"  # no trigger first
    assert TagEdit(replace=(("b", ""),)).apply("a, b, c") == "a, c"  # replaced by nothing: removed
    assert TagEdit(add=("x",)).apply("") == "x"
    with pytest.raises(UserError, match="holds a comma"):
        TagEdit(replace=(("a", "b, c"),))
    assert frequencies(["a, b", "A, c", "b_x, b x"]) == [("a", 2), ("b", 1), ("b_x", 1), ("c", 1)]


def test_the_preview_lists_only_captions_whose_tags_change():
    items = [("1.png", "zxq,red,  circle"), ("2.png", "zxq, blue")]
    changes = preview(items, TagEdit(remove=("red",)))
    assert [(c.file, c.before, c.after) for c in changes] == [("1.png", "zxq,red,  circle", "zxq, circle")]
    with pytest.raises(UserError, match="nothing to change"):
        preview(items, TagEdit())


def test_the_command_shows_then_writes(tmp_path, capsys):
    folder = draw_dataset(tmp_path / "set", n=3, size=32)
    for i, txt in enumerate(sorted(folder.glob("*.txt"))):
        txt.write_text(f"zxq, 1girl, blue_hair{', solo' if i else ''}\n")
    assert main(["tags", str(folder)]) == 0
    listed = capsys.readouterr().out
    assert "4 tags in 3 captions" in listed and "     3  zxq" in listed and "     2  solo" in listed
    before = {p: p.read_text() for p in folder.glob("*.txt")}
    assert main(["tags", str(folder), "--remove", "solo", "--replace", "blue_hair=blue hair"]) == 0
    assert "3 of 3 captions would change" in capsys.readouterr().out
    assert {p: p.read_text() for p in folder.glob("*.txt")} == before  # nothing written without --write
    assert main(["tags", str(folder), "--remove", "solo", "--replace", "blue_hair=blue hair", "--write"]) == 0
    assert {p.read_text() for p in folder.glob("*.txt")} == {"zxq, 1girl, blue hair\n"}
    assert main(["tags", str(folder), "--replace", "blue hair"]) == 2
    assert "has no '='" in capsys.readouterr().err
    assert main(["tags", "example:style", "--add", "ink", "--write"]) == 2
    assert "not edited in place" in capsys.readouterr().err


def test_the_pictures_tab_previews_then_applies(tmp_path):
    ctx = Context.create(tmp_path / "workspace", gpus=0)
    folder = draw_dataset(tmp_path / "upload", n=3, size=32)
    name = tab_pictures.add_pictures(ctx, {"name": "shapes", "files": sorted(folder.iterdir())})["dataset"].value
    for file, _, _ in ws.captions(ctx.root, name):
        ws.set_caption(ctx.root, name, file, "zxq, red, circle")
    assert tab_pictures.count_tags(ctx, {"name": name})["tags"].startswith("**3 tags** in 3 captions")
    edit = {"name": name, "remove": "", "replace": "red", "with_": "crimson", "add": "flat colours", "at": "start",
            "trigger": "zxq"}
    shown = tab_pictures.preview_tags(ctx, edit)
    assert shown["tags_note"].startswith("3 captions would change")
    assert list(shown["changes"]["After"]) == ["zxq, flat colours, crimson, circle"] * 3
    assert {c for _, _, c in ws.captions(ctx.root, name)} == {"zxq, red, circle"}  # a preview writes nothing
    applied = tab_pictures.apply_tags(ctx, edit)
    assert {c for _, _, c in ws.captions(ctx.root, name)} == {"zxq, flat colours, crimson, circle"}
    assert applied["note"].endswith("Changed the tags of 3 captions.") and "crimson (3)" in applied["tags"]
    assert tab_pictures.preview_tags(ctx, edit)["tags_note"] == "No caption would change."
    with pytest.raises(UserError, match="nothing to replace"):
        tab_pictures.preview_tags(ctx, {**edit, "replace": "", "with_": "x"})
