"""python -m fedanchor: the same as the fedanchor command."""
from .cli import main

raise SystemExit(main())
