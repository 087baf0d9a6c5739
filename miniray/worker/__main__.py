"""``python -m miniray.worker``: the same as ``miniray worker`` (how clusters start workers)."""

import sys

from .cli import main

sys.exit(main())
