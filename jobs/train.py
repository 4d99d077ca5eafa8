"""`ray job submit ... -- python jobs/train.py [--config FILE] [key=value ...]`, or run directly."""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
