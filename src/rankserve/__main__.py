import sys

from rankserve.cli import main

sys.exit(main())
