"""``python -m mr2ft`` (and ``accelerate launch -m mr2ft``) runs the command line."""

from mr2ft.cli import run

run()
