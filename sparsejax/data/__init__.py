"""sparsejax data: TFDS builders stored as array_record, read with grain.

No TensorFlow is needed (or imported) to build or read any of these.

  from sparsejax import data
  it = data.make_iterator(cfg, "train", batch_size=8, seq_len=512, seed=0,
                          shard_index=jax.process_index(),
                          shard_count=jax.process_count())
  batch = next(it)  # dict of numpy arrays
  data.task_info(cfg)  # vocab_size, num_classes, kind, image_shape

cfg.name (data.NAMES, or "tfds:<name>"), batch layouts:
  text_corpus  byte LM over local files (default: this Python's stdlib .py
               files); keys root, pattern ("**/*.py"), max_bytes (4e6),
               pack (False): True adds "segment_ids" and "positions"
               int32[B, L] (one id per file in the chunk; positions restart
               per file) and masks targets that start a new file.
  mqar         multi-query associative recall; keys num_kv_pairs,
               vocab_size (8192).
  needle       key -> value needle in a haystack; keys key_len, value_len.
               For long-context eval at any length and depth, no build:
               data.make_needle_batch(seed, batch_size, seq_len, depth).
  -> {"inputs": int32[B, L], "targets": int32[B, L], "loss_mask": f32[B, L]}
  listops      LRA ListOps; keys max_depth, max_args, min_len.
  -> {"inputs": int32[B, L], "label": int32[B]}   (vocab 16, 10 classes)
  pathfinder   synthetic LRA Pathfinder; keys image_size (32),
               num_distractors.
  -> {"image": float32[B, H, W, 1] in [0, 1], "label": int32[B]}
  tfds:<name>  any TFDS dataset already prepared as array_record in data_dir
               (e.g. tfds:cifar10, tfds:imagenet2012 resized to
               cfg.image_size, tfds:lm1b byte-tokenised to the LM dict);
               raises DatasetNotPreparedError (a FileNotFoundError) with
               the command to prepare it otherwise.
Synthetic tasks also take num_examples, num_eval_examples, data_seed.
cfg.data_dir None -> $SPARSEJAX_DATA_DIR or ~/.cache/sparsejax/tfds; each
setting is built there on first use (seconds for the defaults), then reused.
Optional cfg.worker_count (grain worker processes, default 0). With workers,
absl flags must be parsed (absl.app.run does it; else grain raises
UnparsedFlagAccessError), and batches are deterministic per worker_count but
differ between counts: resume with the worker_count that saved the state.

Checkpointing the iterator with orbax (grain 0.2.18): the handler is
`grain.checkpoint.CheckpointHandler` with the args `grain.checkpoint
.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` (the legacy
aliases `grain.python.PyGrainCheckpointSave/Restore` also exist). It writes
one small JSON per process (process_<i>-of-<n>.json):

  mngr = ocp.CheckpointManager(path)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(it)))
  # to resume: build `it` with the same make_iterator arguments, then
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(it)))  # `it` is set in place

Without orbax: `s = it.get_state()` (bytes) and later `it.set_state(s)`.
"""

from sparsejax.data.builder_base import default_data_dir
from sparsejax.data.listops import make_listops_example
from sparsejax.data.mqar import make_mqar_example
from sparsejax.data.needle import make_needle_batch
from sparsejax.data.needle import make_needle_example
from sparsejax.data.pathfinder import make_pathfinder_example
from sparsejax.data.pipeline import make_iterator
from sparsejax.data.pipeline import NAMES
from sparsejax.data.pipeline import task_info
from sparsejax.data.tfds_source import DatasetNotPreparedError
