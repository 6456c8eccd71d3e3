"""`python -m cris_model.cli ...` (what `torchrun -m cris_model.cli train ...` runs)."""

import sys

from cris_model.cli import main

sys.exit(main())
