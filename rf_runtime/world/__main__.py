import sys

from rf_runtime.world.cli import main

sys.exit(main())
