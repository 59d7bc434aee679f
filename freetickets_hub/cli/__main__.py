"""``python -m freetickets_hub.cli`` (so ``accelerate launch -m freetickets_hub.cli`` works)."""

import sys

from freetickets_hub.cli import main

sys.exit(main())
