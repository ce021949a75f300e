"""`python -m ssd_megatron [train|eval|data|bench|report] ...` (works under torchrun -m as well)."""
import sys

from .cli import main

sys.exit(main())
