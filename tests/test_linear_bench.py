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
  ratio = bench.flatness(ours + [longer])
  assert abs(ratio["sparsejax:pallas_triton fwd"] - 1.1) < 1e-9
  assert "sparsejax:pallas_triton fwd+bwd" not in ratio  # one length only
  bench.plot(ours, peers, str(tmp_path / "p.png"))
  assert os.path.getsize(tmp_path / "p.png") > 0


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
