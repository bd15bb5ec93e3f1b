"""The installed package works as a clone does: every package listed, the example datasets on board, and a wheel
that installs into a fresh environment and trains an example from any folder."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import need
from sdlora import examples
from sdlora.dataset import ingest
from sdlora.errors import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_in_the_tree_is_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sdlora").rglob("__init__.py")}
    assert found | {"sdlora.datasets"} == listed  # sdlora.datasets is the repository's datasets/, mapped


def test_an_example_dataset_is_named_like_a_folder():
    assert examples.names() == ["character", "style"]
    data = ingest("example:character", trigger="zqchar")
    assert len(data.records) == 20 and data.records[0].caption.startswith("zqchar")
    with pytest.raises(UserError) as e:
        ingest("example:nope")
    assert e.value.message == "no example dataset named 'nope'"
    assert e.value.hint == "examples: example:character, example:style"


@pytest.mark.slow
def test_a_built_wheel_installs_and_trains_an_example_from_another_folder(tmp_path):
    """`python -m build` makes a wheel; installed into a fresh environment it serves `sdlora app --help` and trains
    `example:character` from a folder that is not the clone. The environment sees this one's dependencies
    (--system-site-packages) so that nothing is downloaded; the wheel's own sdlora comes first."""
    need("build", "pip install build")
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "runs", "workspace", "build", "*.egg-info", "__pycache__", ".pytest_cache", "bench", "docs"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("sdlora-*.whl")

    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=600)
    sdlora = env_dir / "bin" / "sdlora"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = subprocess.run([python, "-c", "import sdlora, sdlora.examples as e; print(sdlora.__file__); "
                            "print(e.examples_dir())"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(Path(p).is_relative_to(env_dir) for p in where), where  # the wheel's copy, not the clone's

    shown = subprocess.run([sdlora, "app", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and "--port" in shown.stdout, shown.stderr

    trained = subprocess.run([sdlora, "train", "example:character", "--base", "tiny", "--trigger", "zqchar",
                              "--out", "runs/demo", "--steps", "4", "--batch-size", "2", "--sample-every", "0",
                              "--quiet"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (elsewhere / "runs" / "demo" / "lora.safetensors").is_file()
    events = [json.loads(line) for line in (elsewhere / "runs" / "demo" / "events.jsonl").read_text().splitlines()]
    assert [e["ok"] for e in events if e["type"] == "verify"] == [True]  # the compatibility check
