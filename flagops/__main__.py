"""`python -m flagops` runs the CLI."""

from __future__ import annotations

from flagops.cli import main

if __name__ == "__main__":
    main()
