"""`make demo`: the whole story on the local sandbox, with no prompt.

`DEMO_EXIT=1` (CI) returns once every app is Ready in both environments; otherwise the
demo stays up, dashboard included, until Ctrl-C, and then cleans up after itself.
"""

from __future__ import annotations

import os
import sys

from conveyor.demo.story import run

if __name__ == "__main__":
    sys.exit(run(interactive=os.environ.get("DEMO_EXIT") != "1"))
