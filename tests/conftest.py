"""pytest set-up for every test: one thread per process (MPI tests run up to 4 ranks on 2 cores).
The builders the tests share are in helpers.py."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
