"""``python -m miniray.channels``: same as ``miniray serve``."""

import sys

from .server import main

sys.exit(main())
