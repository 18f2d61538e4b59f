"""``python -m revive.store._writerd DATABASE``: the entry point of the SQLite writer process.

A module of its own that nothing imports, so that running it does not load a second copy of
:mod:`revive.store._sqlite_child` (which the store imports for the pipe's framing).
"""

import sys

from revive.store._sqlite_child import main

if __name__ == "__main__":
    sys.exit(main())
