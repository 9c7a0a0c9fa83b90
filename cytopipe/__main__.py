import sys

from cytopipe.cli import main

sys.exit(main())
