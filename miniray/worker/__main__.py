"""``python -m miniray.worker``: the same as ``miniray worker`` (how clusters start workers)."""

import sys

from miniray.worker.cli import main

sys.exit(main())
