"""`python -m moebench` is the `moebench` command."""

from moebench.cli import main

raise SystemExit(main())
