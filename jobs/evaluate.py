"""`ray job submit ... -- python jobs/evaluate.py --predictions OUT [--labels L] [--output DIR]`."""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
