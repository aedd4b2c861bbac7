"""`python -m throttle` runs the command line."""

from throttle.cli import main

main()
