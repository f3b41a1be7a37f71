"""``python -m xentlit <command> [Hydra overrides]``: the same as the ``xentlit`` command."""

import sys

from xentlit.commands import main

if __name__ == "__main__":
    sys.exit(main())
