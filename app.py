"""Serve the sdlora browser app from a clone: `python app.py [--port N ...]`, the same as `sdlora app`."""
from sdlora.app import main
if __name__ == "__main__": raise SystemExit(main())
