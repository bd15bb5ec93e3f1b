"""The browser app's page: the four tabs in one Blocks, and serving it with a login check; every process the page
started ends with it.

Each tab is a module (tab_pictures, tab_train, tab_try, tab_export) of handlers, then its layout and wiring; what they
share is a Context. Training runs as its own process (`sdlora.launch.start`; a spare one started ahead, so that a run
skips the seconds of imports); the page follows it through the run directory, so a reload or a second tab finds it
again. Importing this builds nothing; `build()` makes the page; `sdlora app` (or `python app.py` in a clone) serves it
on 127.0.0.1:7860 and ends every process it started when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import signal
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from sdlora import workspace as ws
from sdlora.app import tab_export, tab_pictures, tab_train, tab_try
from sdlora.app.context import Context
from sdlora.errors import UserError
from sdlora.launch import Children

CSS = """
.sdl-progress progress { width: 100%; height: 18px; }
.sdl-progress p { margin: 4px 0 0 0; }
#picture img, #grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
footer { display: none !important; }
"""

TABS = (tab_pictures, tab_train, tab_try, tab_export)  # in the order they are shown and wired


def build(workspace: str | Path = "workspace", models: str | Path | None = None,
          max_unpacked: int = ws.MAX_UNPACKED, gpus: int | None = None, spare: bool = False,
          children: Children | None = None) -> gr.Blocks:
    """The page, for a workspace folder (datasets, runs, exports) and a folder of base models. `gpus`: how many GPUs
    to offer (default: those visible); with more than one the Train tab asks how many a run uses. `spare`: keep a
    training process started ahead (sdlora.spare.Spare), so that a one-GPU run skips the seconds of imports.
    `children`: where every process the page starts is recorded, so that its owner can end them (`serve` does)."""
    ctx = Context.create(workspace, models, max_unpacked=max_unpacked, gpus=gpus, spare=spare, children=children)
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("# sdlora\nTrain a LoRA from your pictures: **1** add pictures and captions, **2** train, "
                    "**3** try it, **4** download it.")
        # followed: the run the page last followed; seen: what the run view shows (see tab_train.poll)
        page = SimpleNamespace(demo=demo, followed=gr.State(None), seen=gr.State(""), timer=gr.Timer(1.5))
        page.pictures, page.train, page.try_it, page.export = (tab.layout(ctx) for tab in TABS)
        for tab in TABS:
            tab.wire(ctx, page)
    return demo


def serve(workspace: str | Path = "workspace", models: str | Path | None = None, *, host: str = "127.0.0.1",
          port: int = 7860, auth: tuple[str, str] | None = None, max_upload_mb: int = 1024,
          max_unpacked: int = ws.MAX_UNPACKED, gpus: int | None = None, block: bool = True,
          spare: bool = True) -> gr.Blocks:
    """Build the page and serve it; files are served only from the workspace and Gradio's own temp folder. `spare`:
    see build.

    Every process the page starts ends with it: when `demo.close()` is called, when a blocking serve is interrupted
    (Ctrl-C, SIGTERM), or at the latest when Python exits. A port already in use is a UserError."""
    root = Path(workspace).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        raise UserError(f"port {port} is already in use", f"close what uses it, or pick another with --port {port + 1}")
    children = Children()
    atexit.register(children.end_all)
    demo = build(root, models, max_unpacked=max_unpacked, gpus=gpus, spare=spare, children=children)
    close = demo.close

    def close_and_end_children(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            children.end_all()

    demo.close = close_and_end_children
    demo.queue(default_concurrency_limit=1)
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the app as Ctrl-C does, its children with it
    try:
        demo.launch(server_name=host, server_port=port, auth=password_check(*auth) if auth else None,
                    allowed_paths=[str(root)],
                    max_file_size=f"{max_upload_mb}mb", prevent_thread_lock=not block, css=CSS, quiet=not block,
                    footer_links=[])
    except OSError as e:  # taken between the check and the launch
        children.end_all()
        if "port" in str(e):
            raise UserError(f"port {port} is already in use", f"pick another with --port {port + 1}") from None
        raise
    except BaseException:
        children.end_all()
        raise
    if block:  # Gradio returns here once interrupted, after closing its server
        children.end_all()
    return demo


def password_check(user: str, password: str, sleep=asyncio.sleep):
    """The page's login check (Gradio awaits it): a wrong guess makes the next ones wait, 0.5 s doubling up to 8 s,
    one guess at a time, so guessing a password is slow; the right one resets the wait.

    A plain async function, not an object with an async __call__: Gradio tests `inspect.iscoroutinefunction`, and an
    object's un-awaited coroutine would count as a yes."""
    state = {"failures": 0, "lock": None}

    async def check(given_user: str, given_password: str) -> bool:
        state["lock"] = state["lock"] or asyncio.Lock()  # made inside the server's event loop
        async with state["lock"]:
            ok = hmac.compare_digest(given_user.encode(), user.encode()) & \
                hmac.compare_digest(given_password.encode(), password.encode())
            if ok:
                state["failures"] = 0
                return True
            state["failures"] += 1
            await sleep(min(0.5 * 2 ** (state["failures"] - 1), 8.0))
            return False

    return check


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (as Gradio will bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
