import os
import sys

from easyquant.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
    # A torchrun rank, its process group already destroyed: leave without the interpreter's
    # teardown, where a finished rank was once seen to abort (SIGABRT, "terminate called without
    # an active exception") and turn a complete run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
