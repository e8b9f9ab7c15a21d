"""Write tests/data/old_message_ops.pt: a small model file whose network calls efa::message and
efa::radial_basis, as every file exported before efa::edge_message does (the shipped models up to
2026-12, and users' files). tests/test_fused.py checks that such files still load and equal the
current code. It was made with the code of commit a1784ce (the last before efa::edge_message):

    git archive a1784ce | tar -x -C /tmp/efa_old
    PYTHONPATH=/tmp/efa_old:tests python tests/data/make_old_message_model.py
"""

from pathlib import Path

import torch

from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file
from helpers import randomised_model

CONFIG = ModelConfig(atomic_numbers=[1, 6, 8], features=8, num_layers=2, cutoff=4.0, use_efa=False)

if __name__ == "__main__":
    torch.manual_seed(0)
    path = Path(__file__).with_name("old_message_ops.pt")
    metadata = save_model_file(randomised_model(CONFIG), CONFIG, path, provenance={"made_by": Path(__file__).name},
                               overwrite=True)
    print(path, metadata["ops"], path.stat().st_size)
