"""`python -m garrison` is the `garrison` command."""

from garrison.cli import main

main()
