import sys

from ktrace.cli import main

sys.exit(main())
