import sys

from dodo.cli import main

sys.exit(main())
