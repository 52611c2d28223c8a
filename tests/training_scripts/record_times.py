"""`hf-mdm train` that also records, per process, the antithetic times of every training micro-batch.

    torchrun --nproc_per_node 2 tests/training_scripts/record_times.py OUT_DIR TRAIN_FLAGS...

writes OUT_DIR/times_rank{R}.json: a list, one entry per micro-batch, of that micro-batch's times s_i.
"""

import json
import os
import sys
from pathlib import Path

from hf_mdm.training import cli, objectives


recorded = []
sequence_losses = objectives.MaskedDiffusionObjective.sequence_losses


def recording_sequence_losses(self, model, input_ids, noise):
    if model.training:  # validation batches are not the training noise
        recorded.append(noise.times.tolist())
    return sequence_losses(self, model, input_ids, noise)


if __name__ == "__main__":
    objectives.MaskedDiffusionObjective.sequence_losses = recording_sequence_losses
    out_dir = Path(sys.argv[1])
    cli.main(sys.argv[2:])
    (out_dir / f"times_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(recorded))
