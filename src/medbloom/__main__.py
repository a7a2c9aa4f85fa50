import sys

from medbloom.cli import main

sys.exit(main())
