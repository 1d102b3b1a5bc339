import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# tiny models run fastest single-threaded, and a shared 2-core machine makes 2 threads much slower
torch.set_num_threads(1)
