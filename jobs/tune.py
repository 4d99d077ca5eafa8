"""`ray job submit ... -- python jobs/tune.py --config RECIPE [key=value ...]`, or run directly."""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
