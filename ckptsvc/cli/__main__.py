"""``python -m ckptsvc.cli``: the ``ckptsvc`` console script."""

import sys

from ckptsvc.cli import main

sys.exit(main())
