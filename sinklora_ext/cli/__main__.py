"""``python -m sinklora_ext.cli``: the `sinklora` console script."""

import sys

from . import main

sys.exit(main())
