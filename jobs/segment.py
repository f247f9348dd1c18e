"""Ray job entrypoint: segment the slide a job spec describes.

    ray job submit --address http://HEAD:8265 --working-dir jobs -- python segment.py examples/s3-slide.yaml

It joins the job's cluster with a plain ``ray.init()`` and exits non-zero, with a one-line error, on bad
input or failed tiles. ``cellsam-ray submit SPEC`` runs the same code (``cellsam-ray run``) and also ships
the spec; ``cellsam-ray`` must be installed on every node either way.
"""

import sys

from cellsam_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
