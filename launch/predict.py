"""Predict with a saved model (the same as `egmf-predict`: egmf/train/predict_main.py), also under torchrun.

    python launch/predict.py --model runs/demo/best --data shards/demo --out predictions.jsonl
"""

import sys

from egmf.train.predict_main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
