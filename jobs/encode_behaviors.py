"""Encode job for `ray job submit --working-dir . -- python jobs/encode_behaviors.py --config ...`.

Thin on purpose: parses the same flags as `bahe encode` and runs it on the cluster the job was
submitted to (Ray sets RAY_ADDRESS for submitted jobs).
"""

import sys

from bahe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
