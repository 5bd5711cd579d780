"""``python -m ufm``: the ``ufm`` command (see `ufm.cli`)."""

import sys

from .cli import main

sys.exit(main())
