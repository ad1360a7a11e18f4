import sys

from easyquant.cli import main

sys.exit(main())
