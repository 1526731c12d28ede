import sys

from autoslim.cli import main

sys.exit(main())
