"""``python -m instructkit`` (used by torchrun: ``torchrun -m instructkit train CONFIG``)."""

import sys

from instructkit.cli import main

sys.exit(main())
