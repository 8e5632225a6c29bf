"""`python -m deepnet` runs the `deepnet` command."""

import sys

from deepnet.cli import main

sys.exit(main())
