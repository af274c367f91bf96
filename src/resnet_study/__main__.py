"""`python -m resnet_study` (and `torchrun -m resnet_study`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
