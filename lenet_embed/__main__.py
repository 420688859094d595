"""`python -m lenet_embed` runs the command-line interface."""

from .cli import main

main(prog_name="lenet-embed")
