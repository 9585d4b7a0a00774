"""``python -m service`` is ``gradsvc``."""

import sys

from service.cli import main

if __name__ == "__main__":  # worker processes are spawned: they import this module too
    sys.exit(main())
