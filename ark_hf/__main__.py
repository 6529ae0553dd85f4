"""`python -m ark_hf`: the `ark-hf` command."""

import sys

from ark_hf.cli import main

sys.exit(main())
