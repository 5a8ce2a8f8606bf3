"""python -m medrobust_screen: the medrobust-screen command (see medrobust_screen.cli)."""

import sys

from medrobust_screen.cli import main

sys.exit(main())
