"""The decode benchmark and the decode-accuracy run, at CPU sizes."""

import dataclasses
import json

from configs import lm
from sparsejax.inference import accuracy
from sparsejax.inference import selection_bench
from sparsejax.inference import selection_plots

SETUP = selection_bench.Setup(
    batch=2, heads=4, kv_heads=2, head_dim=16, dtype="float32", page_size=8,
    quest_budget=64, quest_pages=(8, 16), tidal_budgets=(16,), moa_betas=(0.25, 0.5), impl="xla",
    dense_ref="dense_xla", num_layers=4, dense_layers=1, selection_layers=1)


def test_selection_bench_times_every_method_and_counts_bytes(tmp_path):
  result = selection_bench.run(SETUP, [256], warmup=0, repeats=1, inner=1)
  rows = {r["name"]: r for r in result["rows"]}
  assert not [r for r in result["rows"] if "error" in r]
  for name in ("dense_xla", "paged_dense", "quest", "double_sparsity",
               "tidal_select_16", "tidal_reuse_16", "tidal_16_layer_avg",
               "moa"):
    assert rows[name]["us_per_step"] > 0, name
  assert rows["paged_dense"]["max_abs_err_vs_cudnn"] < 1e-5
  # Bytes: Quest reads 64 of 256 tokens plus min/max per page of 8.
  assert rows["quest"]["read_fraction"] == 64 / 256 + 2 / 8 / 2
  assert rows["quest_p16"]["read_fraction"] == 64 / 256 + 2 / 16 / 2
  assert rows["double_sparsity"]["read_fraction"] == 16 / 256 + 1 / 16 / 2
  assert rows["tidal_reuse_16"]["read_fraction"] == 16 / 256
  # MoA: both spans (0.25 and 0.5 of 256) are raised to min_span 128.
  assert rows["moa"]["read_fraction"] == 128 / 256
  selection_plots.decode_times(result["rows"], [], str(tmp_path / "t.png"))
  selection_plots.speedup_vs_bytes(result["rows"], str(tmp_path / "s.png"))
  assert "quest" in selection_bench.format_table(result["rows"])


def test_decode_accuracy_runs_end_to_end(tmp_path):
  preset = dataclasses.replace(
      accuracy.PRESETS["smoke"], train_lengths=(64,), steps=3,
      eval_lengths=(80,), model={**accuracy.PRESETS["smoke"].model,
                                 "model.num_layers": 2},
      methods={"dense": {}, "tidal_16": dict(token_budget=16,
                                             dense_layers=0)})
  out = accuracy.run(lm.get_config, preset, str(tmp_path), log=lambda m: None)
  saved = json.loads((tmp_path / accuracy.JSON_NAME).read_text())
  for name in ("dense", "tidal_16"):
    assert "error" not in out["methods"][name], out["methods"][name]
    assert 0.0 <= saved["methods"][name]["exact_match"]["80"] <= 1.0
    assert saved["methods"][name]["answer_nll"]["80"] > 0
  assert (tmp_path / "decode_accuracy.png").exists()
  assert accuracy.method_of("tidal_2048", {}).name == "tidal"
