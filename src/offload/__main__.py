"""python -m offload: the offload command line."""

from .cli import main

raise SystemExit(main())
