"""The browser app (Gradio): `build` makes the page, `serve` serves it, `main` is `sdlora app`."""

from sdlora.app.page import build, serve, main  # noqa: F401
