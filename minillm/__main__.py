"""`python -m minillm` runs the command-line interface."""

from minillm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
