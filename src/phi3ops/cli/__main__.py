"""`python -m phi3ops.cli`: the `phi3ops` command, from a checkout without the script."""

from phi3ops.cli.main import main

main()
