"""`python -m control_plane` is the `hotpath` command (used by `hotpath up` for children)."""

import sys

from control_plane.cli import main

sys.exit(main())
