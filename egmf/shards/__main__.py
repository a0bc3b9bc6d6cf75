"""Entry point of `python -m egmf.shards` (see egmf.shards.cli)."""

import sys

from egmf.shards.cli import main

sys.exit(main())
