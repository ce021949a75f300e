import sys

from ..errors import UserError
from . import main

try:
    sys.exit(main())
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
