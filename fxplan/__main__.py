import sys

from fxplan.cli import main

sys.exit(main())
