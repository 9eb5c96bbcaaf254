"""The lightning benchmark and quality reports (no timing, no training)."""

import json
import os

from sparsejax.linear import bench
from sparsejax.linear import quality


def _peers():
  results = [
      dict(case="linear", contender="fla chunk_simple_gla",
           shape="B2 T16384 H16 D128", bwd=False, ms=0.397),
      dict(case="linear", contender="fla fused_chunk_simple_gla",
           shape="B2 T16384 H16 D128", bwd=False, ms=0.790),
      dict(case="linear", contender="fla chunk_simple_gla",
           shape="B2 T16384 H16 D128", bwd=True, ms=1.71),
      dict(case="linear", contender="fla chunk_simple_gla",
           shape="B2 T16384 H16 D128", bwd=True, error="boom"),
      dict(case="na1d", contender="flex", shape="x", bwd=False, ms=1.0)]
  return dict(results=results)


def test_table_against_the_faster_fla_kernel(tmp_path):
  s = bench.Shape(2, 16, 16384)
  ours = [dict(contender="sparsejax:pallas_triton", shape=s.name, batch=2,
               heads=16, seq=16384, head_dim=128, bwd=bwd, ms=ms,
               ms_per_mtoken=ms / 0.032768,
               hbm_fraction=bench.min_bytes(s, bwd) / (ms / 1e3) /
               bench.HBM_BYTES_PER_S)
          for bwd, ms in ((False, 0.2), (True, 1.0))]
  peers = bench.peer_rows(_peers())
  assert len(peers) == 3 and peers[0]["seq"] == 16384
  table = bench.markdown_table(ours, peers)
  assert "| B2 T16384 H16 D128 | fwd | 0.200 | 62% | fla chunk_simple_gla " \
         "| 0.397 | 1.99x |" in table
  assert "| 1.710 | 1.71x |" in table
  # The floor of this shape: 0.125 ms forward at 4.3 TB/s.
  assert abs(bench.min_bytes(s, False) / bench.HBM_BYTES_PER_S - 1.25e-4) < 1e-6
  longer = dict(ours[0], seq=4 * 16384, ms_per_mtoken=1.1 * ours[0][
      "ms_per_mtoken"])
  # Equal work: batch x T fixed, so ms itself should not move with T.
  equal = [dict(ours[0], batch=b, seq=t, shape=bench.Shape(b, 16, t).name,
                series="equal_work", ms_per_mtoken=m)
           for b, t, m in ((8, 32768, 6.0), (2, 131072, 6.6))]
  ratio = bench.flatness(ours + [longer] + equal, (2, 16))
  assert abs(ratio["sparsejax:pallas_triton fwd (B2 H16)"] - 1.1) < 1e-9
  assert abs(ratio["sparsejax:pallas_triton fwd (equal work)"] - 1.1) < 1e-9
  # B2 T128K is in both series (equal work at B2, and the fixed B2 H16).
  assert len(bench._flat_keys(equal[1], (2, 16))) == 2
  assert not any("fwd+bwd" in k for k in ratio)  # one length only
  report = bench.report(table, ours + equal, ratio, ["x"])
  assert "fwd (equal work): 1.100" in report and "Skipped" in report
  # The equal-work rows stay out of the fla table.
  assert "B8 T32768" not in bench.markdown_table(ours + equal, peers)
  bench.plot(ours, peers, str(tmp_path / "p.png"))
  bench.plot_flatness(ours + [longer] + equal, str(tmp_path / "f.png"),
                      (2, 16))
  assert os.path.getsize(tmp_path / "p.png") > 0


def test_peer_rows_from_a_cut_log():
  # peer_variants.py's row format; the last row failed (no time).
  row = lambda c, shape, p, tail: (f"{'linear':9s} {c:28s} {shape:34s} "
                                   f"{p:7s} {tail}")
  log = "\n".join([
      "torch 2.11.0+cu130 NVIDIA H200",
      row("fla chunk_simple_gla", "B2 T4096 H16 D128", "fwd",
          "    0.188 ms    68.6 TF/s"),
      row("sdpa flash causal (dense)", "B2 T4096 H16 D128", "fwd+bwd",
          "    1.500 ms    10.0 TF/s"),
      row("fla chunk_simple_gla", "B2 T16384 H16 D128", "fwd:",
          "FAILED RuntimeError: x")])
  rows = bench.peer_rows_from_log(log)
  assert [(r["contender"], r["seq"], r["bwd"], r["ms"]) for r in rows] == [
      ("fla chunk_simple_gla", 4096, False, 0.188),
      ("sdpa flash causal (dense)", 4096, True, 1.5)]


def test_issue_anchors_fill_only_missing_shapes():
  peers = bench.with_anchors(bench.peer_rows(_peers()))
  got = {(p["contender"], p["shape"], p["bwd"]) for p in peers}
  assert ("fla chunk_simple_gla", "B2 T16384 H16 D128", False) in got
  assert not any("earlier" in c and s == "B2 T16384 H16 D128"
                 for c, s, _ in got)
  assert ("fla fused_chunk_simple_gla (earlier call)", "B1 T4096 H32 D128",
          False) in got


def test_triton_design_names_the_plan():
  text = bench.triton_design(bench.Shape(2, 16, 16384), "bfloat16")
  assert text.startswith("fused fwd (v tile 32, 4 warps, 3 stages)")


def test_quality_plot_and_presets(tmp_path):
  runs = {name: dict(train_loss=[(1, 3.0), (2, 2.5)],
                     eval_loss=[(2, 2.6 + i / 10)],
                     eval=dict(loss=2.6 + i / 10))
          for i, name in enumerate(("softmax", "lightning_hybrid"))}
  result = dict(preset="cpu", hybrid_every=8, runs=runs,
                gap_vs_softmax={"softmax": 0.0, "lightning_hybrid": 0.04})
  path = quality.plot(result, str(tmp_path / "q.png"))
  assert os.path.getsize(path) > 0
  assert quality.PRESETS["gpu"]["every"] == 8  # MiniMax 7 : 1
  variants = quality.variants(8)
  assert variants["lightning_hybrid"].overrides == {
      "attention.dense_every_n": 8}
  json.dumps(quality.PRESETS)  # presets are plain data


def test_needle_variants_are_dense_and_the_lightning_hybrid():
  """The needle run's two configs (no training: that is the GPU step)."""
  from configs import lm  # pylint: disable=g-import-not-at-top
  from sparsejax.evals import compare  # pylint: disable=g-import-not-at-top
  from sparsejax.linear import needle  # pylint: disable=g-import-not-at-top
  from sparsejax.nn import attention_registry  # pylint: disable=g-import-not-at-top
  preset = needle.PRESETS["gpu"]
  assert max(preset.eval_lengths) <= 2 * max(preset.train_lengths)
  common = {**preset.model, "seq_len": 128}
  schedules = {}
  for v in needle.variants(preset, every=2):
    config = compare.make_config(lm.get_config, v, common)
    assert config.data.name == "needle"
    schedules[v.name] = attention_registry.layer_schedule(
        config.model.num_layers, config.attention.name,
        dense_every_n=config.attention.get("dense_every_n", 0) or 0)
  assert schedules == {"dense": ["dense"] * 4,
                       "lightning_hybrid": ["lightning", "dense"] * 2}
