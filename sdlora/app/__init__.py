"""The browser app (Gradio): `main` is `sdlora app`; `build` makes the page and `serve` serves it (from `page`).

The options are read before Gradio is imported, so `sdlora app --help` and a mistyped option answer at once. Each tab
is a module (tab_pictures, tab_train, tab_try, tab_export) whose handlers are plain functions of a Context and the
page's values, callable without a page."""

from __future__ import annotations

import argparse
import os
import sys

# Set before Gradio and the model libraries load, whichever module of the app is imported first.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
for _name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_name, "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    """`sdlora app`: parse the options and serve until interrupted; a user error is one line and exit code 2."""
    p = argparse.ArgumentParser(prog="sdlora app", description="Open the sdlora browser app.")
    p.add_argument("--listen", action="store_true", help="serve on every network interface (0.0.0.0), not only here")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--auth", default=os.environ.get("SDLORA_AUTH"),
                   help="USER:PASS that the page asks for (or set SDLORA_AUTH)")
    p.add_argument("--workspace", default="workspace", help="folder for datasets, runs and exports")
    p.add_argument("--models", help="folder of base models to offer (default: WORKSPACE/models)")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest file a browser may upload")
    args = p.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            p.error("--auth needs USER:PASS")
        auth = (user, password)
    if args.listen and not auth:
        print("warning: --listen without --auth: anyone on the network can use this app")

    from sdlora.app.page import serve
    from sdlora.errors import UserError

    try:
        serve(args.workspace, args.models, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, auth=auth,
              max_upload_mb=args.max_upload_mb)
    except UserError as e:
        print(f"sdlora app: error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Gradio's own loop took over
        return 130
    return 0


def __getattr__(name: str):
    """`sdlora.app.build`, `.serve` and the rest of the page, imported (with Gradio) when first asked for."""
    import importlib
    import importlib.util

    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}"):  # a module: the import system finds it
        raise AttributeError(name)

    return getattr(importlib.import_module("sdlora.app.page"), name)
