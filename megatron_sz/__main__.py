import sys

from megatron_sz.cli import main

sys.exit(main())
