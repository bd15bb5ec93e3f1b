"""The browser app, driven through gradio_client against a launched server: pictures and captions, a real tiny
run with progress and samples, previews at strength 0 and 1, the downloaded file, and what the app refuses."""

import io
import os
import socket
import stat
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from gradio_client import Client, handle_file

from conftest import draw_dataset
from sdlora import app, examples
from sdlora import workspace as ws
from sdlora.errors import UserError

MAX_UPLOAD_MB = 1
MAX_UNPACKED = 3 * 2**20
PROMPT = "zxq, a red circle on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(update):
    """A Dropdown output arrives as an update dict when the handler also changed the choices."""
    return update.get("value") if isinstance(update, dict) else update


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    workspace, models = root / "workspace", root / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "model_index.json").write_text("{ not json")  # a base model that fails to load
    port = free_port()
    demo = app.serve(workspace, models, port=port, max_upload_mb=MAX_UPLOAD_MB, max_unpacked=MAX_UNPACKED,
                     block=False)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False)
    yield client, url, workspace, root
    stop_runs(workspace)
    demo.close()


def stop_runs(workspace):
    for name in ws.run_names(workspace):
        from sdlora import rundir

        if rundir.status(ws.run_dir(workspace, name)) == "running":
            rundir.request(ws.run_dir(workspace, name), "STOP")


def form(client, endpoint, **by_label):
    """Call an endpoint that takes the whole Train form, with its defaults, changing the fields named by their
    on-page labels."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    labels = [p["label"] for p in params]
    assert len(set(labels)) == len(labels), "form labels must be unique"
    assert set(by_label) <= set(labels), set(by_label) - set(labels)
    return client.predict(*[by_label.get(p["label"], p["parameter_default"]) for p in params], api_name=endpoint)


def start(client, **by_label):
    return value(form(client, "/start", **by_label))


def wait_for(client, run, words, timeout=420):
    """Poll the run view like the page's timer does, until the status box shows one of `words`."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        progress, status, loss, samples, _ = client.predict(run, api_name="/show_run")  # and the measures
        seen.append(status)
        if any(w in status or w in progress for w in words):
            return progress, status, loss, samples, seen
        time.sleep(1)
    raise AssertionError(f"run {run} never showed {words}; last status: {seen[-1] if seen else None}")


def png_bytes(color, size=(72, 64)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures(served):
    """Upload loose pictures with captions, a broken file and a .zip (with a zip-slip member) into 'shapes'."""
    client, _, workspace, root = served
    folder = draw_dataset(root / "upload", n=5, size=64)
    (folder / "broken.png").write_bytes(b"not an image")
    archive = root / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(f"more/z{i}.png", png_bytes((200, 40 * i, 60)))
            z.writestr(f"more/z{i}.txt", f"a pink square number {i}")
        z.writestr("../escaped.png", png_bytes((1, 2, 3)))
        z.writestr("/absolute.png", png_bytes((1, 2, 3)))
    files = sorted(folder.iterdir()) + [archive]
    name, gallery, note, _ = client.predict("shapes", [handle_file(str(f)) for f in files], api_name="/add_pictures")
    return value(name), gallery, note


def test_upload_pictures_and_zip(served, pictures):
    _, _, workspace, root = served
    name, gallery, note = pictures
    assert name == "shapes"
    assert len(gallery) == 8  # 5 loose + 3 from the zip; the broken file and the unsafe members are not used
    assert "8 pictures, 8 with captions" in note
    assert "broken.png" in note and "not an image" in note
    assert "../escaped.png" in note and "/absolute.png" in note
    saved = ws.dataset_dir(workspace, "shapes")
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        [f"{stem}.{e}" for stem in [f"img{i:02d}" for i in range(5)] + ["z0", "z1", "z2"] for e in ("png", "txt")])
    assert (saved / "z1.txt").read_text().strip() == "a pink square number 1"
    assert not list(root.rglob("escaped.png")) and not list(root.rglob("absolute.png"))
    assert not (saved / "broken.png").exists()


def test_edit_captions(served, pictures):
    client, _, workspace, _ = served
    gallery, note = client.predict("shapes", "img00.png", "a red circle on a blue background", api_name="/save_caption")
    saved = ws.dataset_dir(workspace, "shapes") / "img00.txt"
    assert saved.read_text().strip() == "a red circle on a blue background"
    assert any(item["caption"] == "img00.png: a red circle on a blue background" for item in gallery)
    gallery, note, trigger = client.predict("shapes", "zxq", "", "", "square number", "square no.",
                                            api_name="/change_all")
    assert "Changed 8 captions" in note and trigger == "zxq"
    captions = {f: c for f, _, c in ws.captions(workspace, "shapes")}
    assert captions["img00.png"] == "zxq, a red circle on a blue background"
    assert captions["z2.png"] == "zxq, a pink square no. 2"


def test_example_datasets_are_offered(served):
    client, _, workspace, _ = served
    assert examples.names() == ["character", "style"]
    name, gallery, note = client.predict("character", api_name="/use_example")
    assert value(name) == "character-example" and len(gallery) > 0
    assert len(ws.captions(workspace, value(name))) == len(list(examples.path("character").glob("*.png")))


@pytest.mark.slow
def test_train_preview_export(served, pictures):
    client, url, workspace, _ = served
    run = start(client, **{"Dataset": "shapes", "Trigger word": "zxq", "Training steps": 20, "Pictures per step": 2,
                           "Rank": 4, "Alpha": 2.0, "Sample every": 10, "Save every": 10, "Sample steps": 8,
                           "Also write the diffusers version": True, "Run name": "first try"})
    assert run == "first-try"
    with pytest.raises(Exception, match="still training; only one run trains at a time"):
        start(client, **{"Dataset": "shapes", "Training steps": 20})
    # A second tab (a fresh page that never started anything) finds the run on its first timer tick.
    other = Client(url, verbose=False).predict("", api_name="/poll")
    assert value(other[0]) == run and "is training" in other[2]
    progress, status, loss, samples, seen = wait_for(client, run, ["is done", "failed", "was stopped"])
    assert "is done" in status, status
    assert any("is training" in s for s in seen)
    assert "Step 20 / 20" in progress and "pictures/s" in progress
    curves = {row[2] for row in loss["data"]}
    assert curves == {"loss", "smoothed"} and len(loss["data"]) >= 4
    steps = [int(s["caption"].split(":")[0].split()[1]) for s in samples]
    assert steps[0] == 0 and steps == sorted(steps) and {0, 10, 20} <= set(steps)
    assert all(Path(s["image"]).is_file() for s in samples)

    # Preview: strength 0 is the base model exactly; strength 1 is not.
    kw = dict(negative="", seed=0, steps=8, guidance=7.0)
    strength0 = np.asarray(Image.open(client.predict(run, "lora.safetensors", None, "tiny", PROMPT, *kw.values(),
                                                     0.0, api_name="/preview")[0]))
    picture, note = client.predict(run, "lora.safetensors", None, "tiny", PROMPT, *kw.values(), 1.0,
                                   api_name="/preview")
    strength1 = np.asarray(Image.open(picture))
    assert note.startswith(f"Made with {run} · lora.safetensors at 1 in ") and "stayed loaded" in note
    from sdlora.generate import Previewer

    base = np.asarray(Previewer("tiny").image(PROMPT, seed=0, steps=8, guidance_scale=7.0))
    assert strength0.shape == base.shape
    assert np.abs(strength0.astype(int) - base.astype(int)).max() == 0
    assert np.abs(strength1.astype(int) - base.astype(int)).max() > 0
    grid = Image.open(client.predict(run, "lora.safetensors", None, "tiny", PROMPT, *kw.values(), 2,
                                     api_name="/strength_grid")[0])
    saves = Image.open(client.predict(run, PROMPT, *kw.values(), api_name="/saves_grid")[0])
    assert grid.height > 2 * 64 and grid.width > 5 * 64  # 2 seeds x 5 strengths
    assert saves.height > 2 * 64  # rows: step 10 and final

    # Download: the kohya-layout file with the form's title and trigger, tensors as trained.
    files, card = client.predict(run, "lora.safetensors", "Shapes Test", "zxq", "circles and squares", True, True,
                                 True, api_name="/export")
    names = sorted(Path(f).name for f in files)
    assert names == ["Shapes-Test-README.md", "Shapes-Test-diffusers.safetensors", "Shapes-Test-sample.png",
                     "Shapes-Test.safetensors"]
    with safe_open(next(f for f in files if f.endswith("-diffusers.safetensors")), "pt") as f:
        assert all(k.startswith(("unet.", "text_encoder.")) for k in f.keys())  # the diffusers/peft layout
    lora = next(f for f in files if f.endswith(".safetensors"))
    with safe_open(lora, "pt") as f, safe_open(str(ws.run_dir(workspace, run) / "lora.safetensors"), "pt") as g:
        keys, meta = set(f.keys()), f.metadata()
        assert keys == set(g.keys())
        assert all(f.get_tensor(k).equal(g.get_tensor(k)) for k in keys)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_") and k.endswith(".lora_up.weight") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    assert meta["modelspec.title"] == "Shapes Test" and meta["modelspec.trigger_phrase"] == "zxq"
    assert meta["modelspec.description"] == "circles and squares" and meta["ss_network_dim"] == "4"
    assert "zxq" in card and "Shapes Test" in card and "| steps | 20 |" in card and PROMPT.split(",")[0] in card
    # the download links work through the server
    download = httpx.get(f"{url}gradio_api/file={lora}")
    assert download.status_code == 200 and len(download.content) == Path(lora).stat().st_size


@pytest.mark.slow
def test_stack_loras(served, pictures, tmp_path):
    """Several LoRAs at once, each at its own strength, on the base model that stays loaded: a run's file and an
    uploaded one."""
    client, _, workspace, _ = served
    run = "first-try"
    if "lora.safetensors" not in ws.lora_files(workspace, run):
        pytest.skip("needs the run of test_train_preview_export")
    step10 = tmp_path / "Step 10.safetensors"
    step10.write_bytes((ws.run_dir(workspace, run) / "lora-step-000010.safetensors").read_bytes())
    _, *slots = client.predict(handle_file(str(step10)), None, None, None, api_name="/stack_upload")
    assert [value(s) for s in slots] == ["loras/Step-10.safetensors", None, None]  # into the first empty slot
    choices = [c[1] for c in slots[0]["choices"]]
    assert choices[:2] == [f"runs/{run}/lora.safetensors", f"runs/{run}/lora-step-000010.safetensors"]
    assert "loras/Step-10.safetensors" in choices
    upload = "loras/Step-10.safetensors"

    def make(first, strength, *stack):
        picture, note = client.predict(run, first, None, "tiny", PROMPT, "", 0, 8, 7.0, strength, *stack,
                                       api_name="/preview")
        return np.asarray(Image.open(picture)).astype(int), note

    alone, _ = make("lora-step-000010.safetensors", 1.0)
    final, _ = make("lora.safetensors", 1.0)
    # the final file at 0 with the uploaded copy of step 10 at 1 is step 10 alone
    swapped, note = make("lora.safetensors", 0.0, upload, 1.0)
    assert np.abs(swapped - alone).max() <= 1
    assert f"Made with {run} · lora.safetensors at 0 + uploaded · Step-10.safetensors at 1 in" in note
    assert "stayed loaded" in note and "setting the LoRAs took" in note
    both, note = make("lora.safetensors", 1.0, None, 1.0, upload, 0.5)  # an empty slot is skipped
    assert np.abs(both - final).max() > 0 and np.abs(both - alone).max() > 0
    assert "at 1 + uploaded · Step-10.safetensors at 0.5" in note and "stayed loaded" in note
    grid, note = client.predict(run, "lora.safetensors", None, "tiny", PROMPT, "", 0, 4, 7.0, 1, upload, 0.5,
                                api_name="/strength_grid")
    assert Image.open(grid).width > 5 * 64 and "Every picture also has uploaded · Step-10.safetensors at 0.5" in note
    with pytest.raises(Exception, match="picked twice"):
        make("lora.safetensors", 1.0, f"runs/{run}/lora.safetensors", 0.5)
    for bad in ["runs/../lora.safetensors", f"runs/{run}/../../secret.txt", "loras/../runs/first-try/config.json",
                "/etc/passwd", f"{run}/lora.safetensors"]:
        with pytest.raises(Exception, match="not a LoRA in the workspace|not a valid|has no file"):
            make("lora.safetensors", 1.0, bad, 0.5)
    # an upload that is not a LoRA is refused, by name
    from safetensors.torch import save_file
    import torch

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    for path, why in [(tmp_path / "model.safetensors", "model.safetensors holds no LoRA weights"),
                      (tmp_path / "notes.txt", "Invalid file type")]:  # Gradio's own check
        with pytest.raises(Exception, match=why):
            client.predict(handle_file(str(path)), upload, None, None, api_name="/stack_upload")
    assert ws.uploaded_loras(workspace) == ["Step-10.safetensors"]


@pytest.mark.slow
def test_gpu_count(tmp_path, monkeypatch):
    """With several GPUs visible the Train tab asks how many; a run on N starts as `sdlora train --gpus N` does
    (accelerate launch). The count is passed in, so no GPU is needed; nothing is launched."""
    import sys as _sys

    from sdlora import launch

    for count in (0, 1):
        (gpus,) = [b for b in app.build(tmp_path / "w", gpus=count).blocks.values() if b.elem_id == "gpus"]
        assert not gpus.visible
    launched = []

    class Process:
        pid = 2**30  # no such process: the run never counts as running

        def __init__(self, cmd, **kw):
            launched.append(cmd)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(launch, "subprocess", type("Subprocess", (), {"Popen": Process, "STDOUT": -2}))
    workspace = tmp_path / "workspace"
    draw_dataset(workspace / "datasets" / "shapes", n=2, size=16)
    port = free_port()
    demo = app.serve(workspace, port=port, gpus=4, block=False, spare=False)  # every launch a recorded command
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
        (gpus,) = [p for p in params if p["label"] == "GPUs"]
        assert gpus["parameter_default"] == 4 and gpus["type"]["enum"] == [1, 2, 3, 4]
        (gpus,) = [b for b in demo.blocks.values() if b.elem_id == "gpus"]
        assert gpus.visible
        text = form(client, "/plan", **{"Dataset": "shapes", "Training steps": 10, "Pictures per step": 2, "GPUs": 2})
        assert "10 steps × 4 pictures (2 on each of 2 GPUs) = 40 pictures" in text
        run = start(client, **{"Dataset": "shapes", "Training steps": 10, "GPUs": 2, "Run name": "two"})
        run_dir = ws.run_dir(workspace, run)
        # as cli.py relaunches
        accelerate = [_sys.executable, "-m", "accelerate.commands.launch", *launch.launch_args(2)]
        assert launched[-1] == launch.train_command(run_dir, 2) == \
            [*accelerate, "-m", "sdlora", "train", "--run-dir", str(run_dir), "--resume"]
        assert launched[-1][3:9] == ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend"]
        run = start(client, **{"Dataset": "shapes", "Training steps": 10, "GPUs": 1, "Run name": "one"})
        assert launched[-1] == [_sys.executable, "-m", "sdlora", "train", "--run-dir",
                                str(ws.run_dir(workspace, run)), "--resume"]
        with pytest.raises(Exception, match="5 GPUs asked for, and 4 are visible|not in the list of choices"):
            start(client, **{"Dataset": "shapes", "GPUs": 5})
        assert len(launched) == 2
    finally:
        demo.close()


@pytest.mark.slow
def test_stop_and_a_failing_run(served, pictures):
    client, _, workspace, _ = served
    run = start(client, **{"Dataset": "shapes", "Training steps": 5000, "Pictures per step": 1, "Rank": 4,
                           "Sample every": 5000, "Save every": 5000, "Sample steps": 4, "Run name": "long"})
    wait_for(client, run, ["Step "], timeout=300)  # it is making progress
    client.predict(run, api_name="/stop")
    _, status, _, _, _ = wait_for(client, run, ["was stopped", "is done", "failed"])
    assert "was stopped" in status
    assert (ws.run_dir(workspace, run) / "lora.safetensors").is_file()

    # A base model that can't load: the run fails in its own process and the page says so.
    run = start(client, **{"Dataset": "shapes", "Base model": "broken", "Training steps": 5, "Run name": "bad"})
    _, status, _, _, _ = wait_for(client, run, ["failed", "is done", "stopped unexpectedly"])
    assert "**bad** failed" in status
    assert client.predict("shapes", api_name="/show_dataset")[1].startswith("**shapes**")  # the app still works


def test_refuses_paths_outside_the_workspace(served, pictures):
    client, url, workspace, root = served
    (root / "secret.txt").write_text("secret")
    for top in ("runs", "exports"):
        (workspace / top / "kept").mkdir(parents=True, exist_ok=True)
    gallery, note, *_ = client.predict("../datasets/shapes", api_name="/show_dataset")
    assert gallery == [] and "is a new dataset" in note  # a name, never a path: nothing is read
    for endpoint, args in [
        ("/save_caption", ["shapes", "../../secret.txt", "x"]),
        ("/save_caption", ["../shapes", "img00.png", "x"]),
        ("/remove_picture", ["shapes", "/etc/passwd"]),
        ("/show_run", ["../datasets"]),
        ("/preview", ["first-try", "../../secret.txt", None, "tiny", "a", "", 0, 2, 7.0, 1.0]),
        ("/preview", ["..", "lora.safetensors", None, "tiny", "a", "", 0, 2, 7.0, 1.0]),
        ("/saves_grid", ["../runs/first-try", "a", "", 0, 2, 7.0]),
        ("/export", ["first-try", "../config.json", "t", "", "", False, False, False]),
        *[("/export", [name, "lora.safetensors", "t", "", "", False, False, False])  # never deletes what it names
          for name in ("..", ".", "../datasets", "../runs", "../exports", "")],
        ("/use_example", ["../../sdlora"]),
    ]:
        with pytest.raises(Exception, match="not a valid|outside the workspace|has no file|no example|no image|"
                                            "no LoRA picked"):
            client.predict(*args, api_name=endpoint)
    assert (root / "secret.txt").read_text() == "secret"
    assert (workspace / "datasets" / "shapes" / "img00.png").is_file()
    assert (workspace / "runs" / "kept").is_dir() and (workspace / "exports" / "kept").is_dir()
    # A base model outside the models folder, given as a path, is refused before anything starts.
    with pytest.raises(Exception, match="not found"):
        start(client, **{"Dataset": "shapes", "Base model": str(root / "models" / ".." / "models" / "broken")})
    # The server hands out files from the workspace only.
    assert httpx.get(f"{url}gradio_api/file=/etc/passwd").status_code == 403
    assert httpx.get(f"{url}gradio_api/file={root / 'secret.txt'}").status_code == 403
    assert httpx.get(f"{url}gradio_api/file={workspace}/../secret.txt").status_code == 403
    inside = ws.dataset_dir(workspace, "shapes") / "img01.png"
    assert httpx.get(f"{url}gradio_api/file={inside}").status_code == 200
    # A dataset name with '..' becomes a plain name inside the workspace.
    name, *_ = client.predict("../../escape", [handle_file(str(inside))], api_name="/add_pictures")
    assert value(name) == "escape" and (workspace / "datasets" / "escape" / "img01.png").is_file()
    assert not (root / "escape").exists()


def test_auth_protects_the_app(tmp_path):
    port = free_port()
    demo = app.serve(tmp_path / "workspace", port=port, auth=("artist", "secret"), block=False, spare=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(f"{url}config").status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False)
        assert httpx.post(f"{url}login", data={"username": "artist", "password": "guess"}).status_code == 400
        client = Client(url, auth=("artist", "secret"), verbose=False)
        assert "Pick a dataset" in client.predict("", api_name="/show_dataset")[1]
    finally:
        demo.close()


def test_wrong_passwords_slow_the_next_guesses():
    import asyncio

    from sdlora.app.page import password_check

    waits = []

    async def sleep(seconds):
        waits.append(seconds)

    check = password_check("artist", "secret", sleep=sleep)
    results = [asyncio.run(check(*guess)) for guess in
               [("artist", "a"), ("artist", "b"), ("root", "secret"), ("artist", "c"), ("artist", "secret"),
                ("artist", "d")] + [("artist", "e")] * 5]
    assert results == [False, False, False, False, True] + [False] * 6
    assert waits == [0.5, 1.0, 2.0, 4.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]  # reset by the right password; at most 8 s


def test_refuses_oversized_and_unsafe_uploads(served, tmp_path):
    client, _, workspace, _ = served
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
    with pytest.raises(Exception):
        client.predict("oversized", [handle_file(str(big))], api_name="/add_pictures")
    assert "oversized" not in ws.dataset_names(workspace)

    bomb = tmp_path / "bomb.zip"  # small on disk, past the cap once unpacked
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", png_bytes((1, 2, 3)))
        z.writestr("padding.txt", b"\0" * (MAX_UNPACKED + 1))
    assert bomb.stat().st_size < MAX_UPLOAD_MB * 2**20
    with pytest.raises(Exception, match="unpacks to"):
        client.predict("bomb", [handle_file(str(bomb))], api_name="/add_pictures")

    linked = tmp_path / "linked.zip"
    with zipfile.ZipFile(linked, "w") as z:
        z.writestr("a.png", png_bytes((1, 2, 3)))
        link = zipfile.ZipInfo("b.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
    with pytest.raises(Exception, match="contains links"):
        client.predict("linked", [handle_file(str(linked))], api_name="/add_pictures")
    assert not {"bomb", "linked"} & set(ws.dataset_names(workspace))


# ---- the workspace rules on their own (no server) ------------------------------------------------------------

def test_upload_reasons_for_every_file(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    for i in range(ws._BATCH + 2):  # two batches, every picture broken: each still gets its reason
        (upload / f"bad{i}.png").write_bytes(b"not a png")
    (upload / "lonely.txt").write_text("a caption without its picture")
    added = ws.add_files(tmp_path / "workspace", "broken", [str(f) for f in sorted(upload.iterdir())])
    assert added.saved == [] and "broken" not in ws.dataset_names(tmp_path / "workspace")
    reasons = dict(added.rejected)
    assert len(reasons) == ws._BATCH + 3 and reasons["bad3.png"] == "not an image or unsupported format"
    assert reasons["lonely.txt"] == "no picture with the same name in this upload"


def test_names_become_safe_slugs():
    assert ws.slug("../../etc/passwd") == "etc-passwd"
    assert ws.slug("My Cat (2024)") == "My-Cat-2024"
    assert ws.slug("..") == "untitled" and ws.slug("") == "untitled" and ws.slug("...", "x") == "x"


def test_workspace_paths_stay_inside(tmp_path):
    with pytest.raises(UserError):
        ws.dataset_dir(tmp_path, "../x")
    with pytest.raises(UserError):
        ws.run_dir(tmp_path, "a/b")
    with pytest.raises(UserError):
        ws.inside(tmp_path, "a", "../../b")
    (tmp_path / "datasets").mkdir()
    os.symlink("/etc", tmp_path / "datasets" / "link")
    with pytest.raises(UserError):
        ws.inside(tmp_path / "datasets", "link", "passwd")


def test_base_models_stay_in_the_models_folder(tmp_path):
    models = tmp_path / "models"
    (models / "sd15").mkdir(parents=True)
    (models / "sd15" / "model_index.json").write_text("{}")
    (models / "sd15" / "unet").mkdir()
    (models / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # a part, not a model
    elsewhere = tmp_path / "elsewhere" / "sdxl"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model_index.json").write_text("{}")
    (models / "linked").symlink_to(elsewhere.parent)  # a folder of models kept elsewhere, linked in
    listed = [v for label, v in ws.base_models(models) if not label.endswith("(downloaded)")]  # not the hub cache
    assert listed == ["tiny", "linked/sdxl", "sd15"]
    assert ws.resolve_base(models, "sd15") == str(models / "sd15")
    assert ws.resolve_base(models, "linked/sdxl") == str(models / "linked" / "sdxl")
    assert ws.resolve_base(models, "tiny") == "tiny"
    assert ws.resolve_base(models, "org/model-name") == "org/model-name"
    for bad in ["../models/sd15", str(models / "sd15"), "/etc", "sd15/../../x", "../../x/y"]:
        with pytest.raises(UserError):
            ws.resolve_base(models, bad)


def test_plan_counts_repeats_and_epochs(served):
    client, _, workspace, _ = served
    folder = ws.dataset_dir(workspace, "repeats")
    draw_dataset(folder, n=2, size=16)
    draw_dataset(folder / "5_extra", n=2, size=16)
    assert ws.dataset_counts(workspace, "repeats") == (4, 4, 12)  # 2 + 2 pictures x 5 repeats per round
    text = form(client, "/plan", **{"Dataset": "repeats", "Training steps": 30, "Pictures per step": 4})
    assert "30 steps × 4 pictures = 120 pictures" in text and "4 pictures (12 with repeats)" in text
    assert "**10 times**" in text and "Time: about" in text


def test_import_builds_nothing(tmp_path, monkeypatch):
    import importlib

    import gradio

    from sdlora.app import page

    monkeypatch.chdir(tmp_path)
    for module in (page, app):  # the modules' code run again, as a fresh import runs it
        importlib.reload(module)
        assert not any(isinstance(v, gradio.Blocks) for v in vars(module).values())
    assert list(tmp_path.iterdir()) == []  # and nothing written
