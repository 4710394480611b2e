"""``python -m sb3_offtrc``: see :mod:`sb3_offtrc.cli`."""

import sys

from sb3_offtrc.cli import main

sys.exit(main())
