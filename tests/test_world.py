"""The procedural world, the model-free checker and the committed example datasets."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.tiny import checker, world

ROOT = Path(__file__).resolve().parents[1]


def _scenes(n, seed, max_objects=2):
    rng = random.Random(seed)
    return [world.sample_scene(rng, max_objects) for _ in range(n)]


def test_make_batch_is_deterministic_per_seed():
    images, captions = world.make_batch(16, seed=3)
    again, captions_again = world.make_batch(16, seed=3)
    assert captions == captions_again
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
    assert images[0].size == (64, 64) and images[0].mode == "RGB"
    other, other_captions = world.make_batch(16, seed=4)
    assert other_captions != captions


def test_scenes_keep_objects_off_the_background_and_apart():
    for scene in _scenes(300, seed=1):
        assert 1 <= len(scene.objects) <= 2
        assert all(o.color != scene.background for o in scene.objects)
        if len(scene.objects) == 2:
            a, b = (world.POSITIONS[o.position] for o in scene.objects)
            assert a != b


def test_full_caption_names_everything_drawn_and_parses_back():
    for scene in _scenes(200, seed=2):
        text = world.caption(scene)
        for obj in scene.objects:
            for word in (obj.shape, obj.color, obj.size, obj.position):
                assert word in text
        assert text.endswith(f"{scene.background} background")
        first = scene.objects[0]
        assert world.parse_prompt(text) == {"shape": first.shape, "color": first.color, "size": first.size,
                                            "position": first.position, "background": scene.background}


def test_partial_captions_are_short_and_never_wrong():
    rng = random.Random(5)
    lengths = set()
    for scene in _scenes(300, seed=5):
        parsed = world.parse_prompt(world.caption(scene, rng))
        first = scene.objects[0]
        truth = {"shape": first.shape, "color": first.color, "size": first.size, "position": first.position,
                 "background": scene.background}
        assert all(v is None or v == truth[k] for k, v in parsed.items()), (parsed, truth)
        lengths.add(sum(v is not None for v in parsed.values()))
    assert {1, 2, 5} <= lengths  # "a blue background", "a red star", full


def test_parse_prompt_reads_free_text():
    assert world.parse_prompt("zkstyle, two grey stars in the centre on an orange background") == {
        "shape": "star", "color": "gray", "size": None, "position": "center", "background": "orange"}
    assert world.parse_prompt("a blue background")["color"] is None
    assert world.parse_prompt("crosses")["shape"] == "cross"


def test_render_puts_the_object_where_the_caption_says():
    for position, (x, y) in world.POSITIONS.items():
        scene = world.Scene([world.Obj("circle", "white", "small", position)], "black")
        gray = np.asarray(world.render(scene).convert("L"))
        ys, xs = np.nonzero(gray > 127)
        assert abs(xs.mean() + 0.5 - x * 64) < 1 and abs(ys.mean() + 0.5 - y * 64) < 1, position
        assert ((gray > 40) & (gray < 200)).any()  # antialiased: the edge has in-between levels


def _accuracy(images_and_captions):
    hits = {"background_ok": 0, "object_color_ok": 0, "shape_ok": 0}
    for image, text in images_and_captions:
        result = checker.check(image, text)
        for key in hits:
            hits[key] += result[key]
    return {key: n / len(images_and_captions) for key, n in hits.items()}


@pytest.mark.slow
def test_checker_reads_fresh_world_images():
    scenes = _scenes(300, seed=777, max_objects=1)
    clean = _accuracy([(world.render(s), world.caption(s)) for s in scenes])
    assert clean["background_ok"] >= 0.99 and clean["object_color_ok"] >= 0.97 and clean["shape_ok"] >= 0.90, clean
    rng = random.Random(0)
    blurred = _accuracy([(checker._degrade(world.render(s), rng, blur=1.5, noise=15.0), world.caption(s))
                         for s in scenes])
    print(f"checker accuracy, clean: {clean}; blurred (sigma<=1.5) + noise (sd<=15): {blurred}")
    assert min(blurred.values()) >= 0.85, blurred


def test_check_reports_values_and_unasked_attributes_as_none():
    scene = world.Scene([world.Obj("heart", "red", "large", "center")], "blue")
    result = checker.check(world.render(scene), "a red heart on a blue background")
    assert result == {"background_ok": True, "object_color_ok": True, "shape_ok": True,
                      "background": "blue", "object_color": "red", "shape": "heart"}
    result = checker.check(world.render(scene), "a green background")
    assert result["background_ok"] is False and result["object_color_ok"] is None and result["shape_ok"] is None
    empty = checker.check(Image.new("RGB", (64, 64), world.COLORS["white"]), "a red star")
    assert empty["object_color"] is None and empty["object_color_ok"] is False


def _dataset(name):
    files = sorted((ROOT / "datasets" / name).glob("*.png"))
    assert len(files) == 20
    return [Image.open(f).convert("RGB").resize((64, 64), Image.LANCZOS) for f in files]


@pytest.mark.parametrize("name, score", [("style", checker.style_score), ("character", checker.character_score)])
def test_dataset_scores_separate_datasets_from_the_world(name, score):
    world_images = [world.render(s) for s in _scenes(200, seed=9)]
    in_dataset = [score(im) for im in _dataset(name)]
    in_world = [score(im) for im in world_images]
    print(f"{name}_score: dataset min {min(in_dataset):.3f}, world max {max(in_world):.3f}")
    assert min(in_dataset) > max(in_world) + 0.01


def test_committed_datasets_match_the_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_datasets", ROOT / "scripts" / "make_datasets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    for name in ("style", "character"):
        made = sorted(p.name for p in (tmp_path / name).iterdir())
        committed = sorted(p.name for p in (ROOT / "datasets" / name).iterdir())
        assert made == committed and len(made) == 40
        for file in made:
            assert (tmp_path / name / file).read_bytes() == (ROOT / "datasets" / name / file).read_bytes(), file
        captions = [(tmp_path / name / f).read_text() for f in made if f.endswith(".txt")]
        trigger = {"style": "zkstyle, ", "character": "zqchar, "}[name]
        assert all(c.startswith(trigger) and c.endswith(" background\n") for c in captions)


def test_textures_are_drawn_only_when_named():
    rng = random.Random(11)
    words = world.OBJECT_PATTERNS + world.BACKGROUND_PATTERNS + ("eyes",)
    textured = 0
    for _ in range(400):
        scene = world.sample_scene(rng, patterns=True)
        if scene.style:  # its style word names its textures: the next test
            continue
        for text in (world.caption(scene), world.caption(scene, rng)):
            if "background" in text and scene.background_pattern:
                assert f"{scene.background_pattern} {scene.background} background" in text
            first = scene.objects[0]
            described = text.split(" and ")[0].split(" on ")[0]  # the first object's words
            if first.shape in described:
                assert (first.pattern or "") in described and (" with eyes" in described) == first.eyes
            parsed = world.parse_prompt(text)
            assert parsed["background"] in (None, scene.background) and parsed["shape"] in (None, first.shape)
        textured += any(w in world.caption(scene).split() for w in words)
    assert 80 < textured < 300  # some scenes textured, most plain
    # Without patterns a seed draws exactly the plain scenes it always drew (the example datasets depend on it).
    assert [world.caption(world.sample_scene(random.Random(s))) for s in range(20)] == \
        [world.caption(world.sample_scene(random.Random(s), patterns=False)) for s in range(20)]


def test_a_style_word_always_draws_its_look_and_the_caption_names_it_instead_of_the_textures():
    rng = random.Random(5)
    styled = [s for s in (world.sample_scene(rng, patterns=True) for _ in range(600)) if s.style]
    assert 30 < len(styled) < 100  # about 1 in 10
    for scene in styled:
        style = world.STYLES[scene.style]
        assert (scene.background_pattern, scene.background_look) == (style.background_pattern, style.background_look)
        assert all((obj.pattern == "outlined") == bool(style.outline) for obj in scene.objects)
        for text in (world.caption(scene), world.caption(scene, rng)):
            assert text.startswith(scene.style + ", ")
            assert not set(text.split()) & set(world.OBJECT_PATTERNS + world.BACKGROUND_PATTERNS), text
            assert world.parse_prompt(text)["background"] in (None, scene.background)
    # the same word draws the same background wherever it comes
    same = [s for s in styled if s.style == styled[0].style]
    assert len({(s.background_pattern, s.background_look) for s in same}) == 1
    assert len(world.STYLES) == 48 and not any(w.startswith(("zk", "zq")) for w in world.STYLES)


def test_detail_scores_read_the_worlds_textures_and_the_datasets():
    hatched = world.Scene([world.Obj("circle", "red", "small", "center")], "yellow", "striped", (0.1, 5.0, 1.0))
    plain = world.Scene([world.Obj("circle", "red", "large", "center", eyes=True)], "yellow")
    assert checker.hatching_score(world.render(hatched)) > checker.HATCHING_PRESENT  # direction 0: "/" lines
    assert checker.eye_pair_score(world.render(plain)) > checker.EYES_PRESENT
    plain.objects[0].eyes = False
    assert not checker.detail_present("character", world.render(plain))
    assert not checker.detail_present("style", world.render(plain))
    for name in ("style", "character"):
        assert all(checker.detail_present(name, im) for im in _dataset(name)), name
