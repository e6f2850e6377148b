"""`python -m minidisk` is the `minidisk` command."""

from minidisk.cli.main import main

main()
