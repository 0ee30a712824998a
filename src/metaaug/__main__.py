"""`python -m metaaug` is the `metaaug` command."""

from metaaug.cli.app import main

main()
