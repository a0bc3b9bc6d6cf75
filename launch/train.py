"""Train EGMF: the file the `deepspeed` launcher, `torchrun` and slurm/train_egmf.sh start once per rank.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json --config launch/recipes/mosei.toml ...
    python launch/train.py --help          # the same as `egmf-train`: egmf/train/main.py
"""

import sys

from egmf.train.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
