"""Command line of fwagen in a source checkout; installed, the same is the `fwagen` command."""
from fwagen.cli_main import main

if __name__ == "__main__":
    raise SystemExit(main())
