"""Tests for sparsejax.data: builders, grain pipeline, state, no TensorFlow."""

import subprocess
import sys
import textwrap
import types

import grain
import numpy as np
import pytest

from sparsejax import data
from sparsejax.data import listops

SEQ = 32
TASKS = ("text_corpus", "mqar", "needle", "listops", "pathfinder")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cfg(name, data_dir, **kw):
  base = dict(name=name, data_dir=data_dir, max_bytes=200_000,
              num_examples=64, num_eval_examples=32)
  return types.SimpleNamespace(**{**base, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _rows(batches, key):
  return {r.tobytes() for b in batches for r in b[key]}


def test_unknown_name_lists_valid_names(data_dir):
  with pytest.raises(ValueError, match="text_corpus.*mqar.*pathfinder"):
    data.make_iterator(_cfg("nope", data_dir), batch_size=2, seq_len=SEQ)
  with pytest.raises(ValueError, match="valid names"):
    data.task_info(_cfg("tfds:", data_dir))


@pytest.mark.parametrize("name", TASKS)
def test_shapes_and_dtypes(name, data_dir):
  info = data.task_info(_cfg(name, data_dir))
  for split in ("train", "eval"):
    batch = next(data.make_iterator(_cfg(name, data_dir), split,
                                    batch_size=4, seq_len=SEQ))
    if info["kind"] == "lm":
      assert set(batch) == {"inputs", "targets", "loss_mask"}
      assert batch["inputs"].shape == batch["targets"].shape == (4, SEQ)
      assert batch["loss_mask"].dtype == np.float32
      assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
      assert 0 <= batch["inputs"].min() and (
          batch["inputs"].max() < info["vocab_size"])
      assert batch["loss_mask"].sum() > 0
    elif info["kind"] == "seq_cls":
      assert batch["inputs"].shape == (4, SEQ)
      assert batch["inputs"].dtype == np.int32
      assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
      assert batch["inputs"].max() < info["vocab_size"]
      assert batch["label"].max() < info["num_classes"]
    else:
      assert batch["image"].shape == (4, *info["image_shape"])
      assert batch["image"].dtype == np.float32
      assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
      assert batch["label"].dtype == np.int32


def test_text_corpus_is_shifted_bytes(data_dir):
  batch = next(data.make_iterator(_cfg("text_corpus", data_dir), "eval",
                                  batch_size=2, seq_len=SEQ))
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  text = bytes(batch["inputs"][0].astype(np.uint8))
  assert text.isascii() or b"\0" in text  # stdlib sources, 0 = separator


@pytest.mark.parametrize("name", ("text_corpus", "mqar"))
def test_same_seed_same_batches(name, data_dir):
  make = lambda seed: data.make_iterator(_cfg(name, data_dir), batch_size=4,
                                         seq_len=SEQ, seed=seed)
  _assert_batches_equal(_take(make(1), 3), _take(make(1), 3))
  other = _take(make(2), 3)
  assert _rows(other, "inputs") != _rows(_take(make(1), 3), "inputs")


# Random content, so equal rows would mean the same record (text has repeats).
@pytest.mark.parametrize("name,key", (("mqar", "inputs"),
                                      ("pathfinder", "image")))
def test_shards_are_disjoint(name, key, data_dir):
  shards = [list(data.make_iterator(
      _cfg(name, data_dir), batch_size=4, seq_len=SEQ, shard_index=i,
      shard_count=2, num_epochs=1)) for i in range(2)]
  rows = [_rows(s, key) for s in shards]
  assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_bad_shard_index(data_dir):
  with pytest.raises(ValueError, match="shard_index"):
    data.make_iterator(_cfg("mqar", data_dir), batch_size=2, seq_len=SEQ,
                       shard_index=2, shard_count=2)


def test_iterator_state_round_trip(data_dir):
  it = data.make_iterator(_cfg("mqar", data_dir), batch_size=4, seq_len=SEQ)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = data.make_iterator(_cfg("mqar", data_dir), batch_size=4,
                             seq_len=SEQ)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expected)


def test_orbax_checkpoint_round_trip(data_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: data.make_iterator(_cfg("needle", data_dir), batch_size=4,
                                    seq_len=SEQ)
  it = make()
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    fresh = make()
    mngr.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 2), expected)


@pytest.mark.parametrize("depth", (0.0, 0.3, 1.0))
@pytest.mark.parametrize("seq_len", (64, 2048))
def test_needle_answer_is_in_haystack(depth, seq_len):
  rng = np.random.default_rng(7)
  ex = data.make_needle_example(rng, seq_len, depth, key_len=2, value_len=3)
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  # Find the needle only through its marker, then read key and value.
  (pos,) = np.flatnonzero(inputs == 1)
  assert pos == ex["needle_pos"]
  key, value = inputs[pos + 1:pos + 3], inputs[pos + 4:pos + 7]
  assert inputs[pos + 3] == 2
  np.testing.assert_array_equal(targets[mask == 1], value)
  np.testing.assert_array_equal(value, ex["value"])
  (query,) = np.flatnonzero(inputs == 3)
  np.testing.assert_array_equal(inputs[query + 1:query + 3], key)
  assert mask.sum() == 3 and mask[-3:].all()
  span = seq_len + 1 - 2 * 7
  assert pos == round(depth * span)


def test_needle_batch():
  b = data.make_needle_batch(0, 3, 4096, 0.5)
  assert b["inputs"].shape == b["targets"].shape == (3, 4096)
  assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  assert (b["loss_mask"].sum(1) == 2).all()
  for i in range(3):
    pos = b["needle_pos"][i]
    value = b["inputs"][i, pos + 4:pos + 6]
    np.testing.assert_array_equal(b["targets"][i][b["loss_mask"][i] == 1],
                                  value)
  _assert_batches_equal([b], [data.make_needle_batch(0, 3, 4096, 0.5)])


def _eval_listops(tokens):
  """Independent evaluator: a stack machine over the token sequence."""
  ops = {11: max, 12: min, 13: lambda a: int(np.median(a)),
         14: lambda a: sum(a) % 10}
  stack = []
  for t in tokens:
    t = int(t)
    if t == 0:
      break
    if 1 <= t <= 10:
      stack.append(t - 1)
    elif t in ops:
      stack.append(("op", t))
    else:  # ']': pop arguments back to the operator
      args = []
      while not isinstance(stack[-1], tuple):
        args.append(stack.pop())
      _, op = stack.pop()
      stack.append(ops[op](args[::-1]))
  assert len(stack) == 1
  return stack[0]


def test_listops_labels_are_correct(data_dir):
  for batch in data.make_iterator(_cfg("listops", data_dir), "eval",
                                  batch_size=8, seq_len=SEQ):
    for tokens, label in zip(batch["inputs"], batch["label"]):
      assert _eval_listops(tokens) == label, listops.to_string(tokens)
  for seed in range(50):
    ex = data.make_listops_example(np.random.default_rng(seed), 256)
    assert _eval_listops(ex["inputs"]) == ex["label"]
    assert (ex["inputs"] > 0).sum() >= 256 // 4


def test_pathfinder_labels_balanced():
  labels = [data.make_pathfinder_example(np.random.default_rng(s), 32)["label"]
            for s in range(200)]
  assert 60 < sum(labels) < 140


def test_prepared_tfds_by_name(data_dir):
  cfg = _cfg("pathfinder", data_dir)
  own = list(data.make_iterator(cfg, "eval", batch_size=4, seq_len=SEQ))
  cfg_name = "image_size32_num_distractors2_num_eval32_num_train64_seed0"
  by_name = _cfg(f"tfds:sj_pathfinder/{cfg_name}", data_dir)
  assert data.task_info(by_name)["image_shape"] == (32, 32, 1)
  assert data.task_info(by_name)["num_classes"] == 2
  generic = list(data.make_iterator(by_name, "eval", batch_size=4,
                                    seq_len=SEQ))
  _assert_batches_equal(generic, own)


def test_unprepared_tfds_gives_clear_error(tmp_path):
  for name in ("tfds:mnist", "tfds:no_such_dataset_xyz"):
    cfg = _cfg(name, str(tmp_path))
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build"):
      data.make_iterator(cfg, batch_size=2, seq_len=SEQ)


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("SPARSEJAX_DATA_DIR", "/x/y")
  assert data.default_data_dir(None) == "/x/y"
  monkeypatch.delenv("SPARSEJAX_DATA_DIR")
  assert data.default_data_dir(None).endswith(".cache/sparsejax/tfds")
  assert data.default_data_dir("/a") == "/a"


def test_no_tensorflow_imported(tmp_path):
  # A fresh interpreter, so other tests' imports cannot hide a lazy import.
  code = textwrap.dedent(f"""
      import sys, types
      from sparsejax import data
      for name in {TASKS!r} + ("tfds:mnist",):
        cfg = types.SimpleNamespace(name=name, data_dir={str(tmp_path)!r},
                                    max_bytes=100_000, num_examples=16,
                                    num_eval_examples=8)
        try:
          next(data.make_iterator(cfg, batch_size=2, seq_len=32))
        except data.DatasetNotPreparedError:
          assert name == "tfds:mnist"
      assert "tensorflow" not in sys.modules, "tensorflow was imported"
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
