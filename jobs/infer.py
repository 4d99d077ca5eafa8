"""`ray job submit ... -- python jobs/infer.py --checkpoint CKPT --input SRC --output DST [key=value ...]`."""

import sys

from raycv.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
