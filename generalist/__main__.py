"""`python -m generalist ...`, and so `torchrun --nproc-per-node N -m generalist train ...`."""

import sys

from generalist.cli import main

sys.exit(main())
