import sys

from minlm.cli import main

sys.exit(main())
