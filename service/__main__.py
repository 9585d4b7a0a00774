"""``python -m service`` is ``gradsvc``."""

import sys

from service.cli import main

sys.exit(main())
