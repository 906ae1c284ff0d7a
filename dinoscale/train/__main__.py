import sys

from dinoscale.train.cli import main

sys.exit(main())
