"""`python -m cqrs.app`: the `cqrs` command."""

from cqrs.app.entry import main

main()
