"""CPU check of MoA's response mask: one 2-layer needle LM, MoA profiled on
the answers' loss (`moa`) and on every token's (`moa_allloss`), beside dense.

  python benchmarks/decode/moa_response_mask_cpu.py 4000 480 OUT_DIR
  # args: max train steps, train seconds (2 cores: about 8 minutes in all)

Results of 2026-12-04 in benchmarks/decode/moa_response_mask_cpu/.
"""

import dataclasses
import sys

from configs import lm
from sparsejax.inference import accuracy

_MOA = dict(density_budget=0.25, min_span=16, block=16, sink_size=8,
            target_len=512)
PRESET = accuracy.Preset(
    model={"dtype": "float32", "model.num_layers": 2, "model.d_model": 128,
           "model.mlp_dim": 256, "model.num_heads": 4,
           "model.num_kv_heads": 2, "model.rope_theta": 1e4,
           "optimizer.learning_rate": 3e-3,
           "attention.options": dict(block_size=32)},
    train_lengths=(64, 128, 256), tokens_per_step=8192, steps=4000,
    train_seconds=480.0, eval_lengths=(256, 512), eval_examples=16,
    calib_len=256,
    methods={"dense": {}, "moa": _MOA,
             "moa_allloss": dict(_MOA, response_mask=False)})


def main(argv):
  steps, seconds, out_dir = int(argv[1]), float(argv[2]), argv[3]
  preset = dataclasses.replace(PRESET, steps=steps, train_seconds=seconds)
  accuracy.run(lm.get_config, preset, out_dir,
               log=lambda m: print(m, flush=True))


if __name__ == "__main__":
  main(sys.argv)
