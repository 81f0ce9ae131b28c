"""`python -m cqrs.app`: the `cqrs` command."""

from cqrs.app.cli import main

main()
