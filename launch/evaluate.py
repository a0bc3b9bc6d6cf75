"""Evaluate a saved model alone (the same as `egmf-evaluate`: egmf/train/evaluate_main.py), also under torchrun.

    python launch/evaluate.py --checkpoint runs/demo/best --splits test
"""

import sys

from egmf.train.evaluate_main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
