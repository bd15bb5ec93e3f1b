"""`python -m sdlora ...` runs the command line (the app starts runs this way)."""

import sys

from sdlora.cli import main

sys.exit(main())
