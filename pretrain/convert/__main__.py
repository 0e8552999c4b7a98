"""``python -m pretrain.convert``."""

import sys

from .cli import main

sys.exit(main())
