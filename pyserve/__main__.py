"""`python -m pyserve ...` is the `pyserve` command."""

import sys

from .cli import main

sys.exit(main())
