import sys

from jacdistill_cli.cli import main

sys.exit(main())
