import sys

from gptlab.cli.main import main

sys.exit(main())
