"""`python -m postbode`: the same as the `postbode` command."""

from postbode.cli import main

main()
