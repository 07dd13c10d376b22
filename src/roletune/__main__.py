import sys

from roletune.cli import main

sys.exit(main())
