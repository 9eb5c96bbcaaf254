"""The decode benchmark and the decode-accuracy run, at CPU sizes."""

import dataclasses
import json

from configs import lm
from sparsejax.inference import accuracy
from sparsejax.inference import selection_bench
from sparsejax.inference import selection_plots

SETUP = selection_bench.Setup(
    batch=2, heads=4, kv_heads=2, head_dim=16, dtype="float32", page_size=8,
    quest_budget=64, quest_pages=(8,), tidal_budgets=(16,), moa_betas=(0.25, 0.5), impl="xla",
    dense_ref="dense_xla", num_layers=4, dense_layers=1, selection_layers=1)


def test_selection_bench_times_every_method_and_counts_bytes(tmp_path):
  # (Double Sparsity and MoA rows: the same Case plumbing; their decode
  # paths are tested in test_decode_methods.py.)
  result = selection_bench.run(SETUP, [256], warmup=0, repeats=1, inner=1,
                               include=["dense_xla", "paged_dense", "quest",
                                        "tidal"], log=lambda r: None)
  rows = {r["name"]: r for r in result["rows"]}
  assert not [r for r in result["rows"] if "error" in r]
  for name in ("dense_xla", "paged_dense", "quest", "quest_select",
               "quest_attend", "tidal_select_16", "tidal_reuse_16",
               "tidal_16_layer_avg"):
    assert rows[name]["us_per_step"] > 0, name
  # Outputs that must equal dense decode: the paged kernel over every page
  # and a TidalDecode selection layer (full attention).
  assert rows["paged_dense"]["max_abs_err_vs_dense"] < 1e-5
  assert rows["tidal_select_16"]["max_abs_err_vs_dense"] < 1e-5
  # Bytes: Quest reads 64 of 256 tokens plus min/max per page of 8.
  assert rows["quest"]["read_fraction"] == 64 / 256 + 2 / 8 / 2
  assert rows["tidal_reuse_16"]["read_fraction"] == 16 / 256
  # Layer average: 1 dense, 1 selection, 2 reuse layers of 4.
  want = (rows["paged_dense"]["us_per_step"] +
          rows["tidal_select_16"]["us_per_step"] +
          2 * rows["tidal_reuse_16"]["us_per_step"]) / 4
  assert abs(rows["tidal_16_layer_avg"]["us_per_step"] - want) < 1e-6
  selection_plots.decode_times(result["rows"], [], str(tmp_path / "t.png"))
  selection_plots.speedup_vs_bytes(result["rows"], str(tmp_path / "s.png"))
  assert "quest" in selection_bench.format_table(result["rows"])


def test_decode_accuracy_runs_end_to_end(tmp_path):
  # steps=0: the untrained model (training is the smoke preset's and the
  # GPU run's). TidalDecode with a budget over the context must score
  # exactly like dense through the whole harness.
  preset = dataclasses.replace(
      accuracy.PRESETS["smoke"], train_lengths=(64,), steps=0,
      eval_lengths=(80,), model={**accuracy.PRESETS["smoke"].model,
                                 "model.num_layers": 2},
      methods={"dense": {}, "tidal_128": dict(token_budget=128,
                                              dense_layers=0)})
  out = accuracy.run(lm.get_config, preset, str(tmp_path), log=lambda m: None)
  saved = json.loads((tmp_path / accuracy.JSON_NAME).read_text())
  for name in ("dense", "tidal_128"):
    assert "error" not in out["methods"][name], out["methods"][name]
    assert 0.0 <= saved["methods"][name]["exact_match"]["80"] <= 1.0
    assert saved["methods"][name]["answer_nll"]["80"] > 0
  dense, tidal = (saved["methods"][n] for n in ("dense", "tidal_128"))
  assert tidal["exact_match"] == dense["exact_match"]
  assert abs(tidal["answer_nll"]["80"] - dense["answer_nll"]["80"]) < 1e-4
  assert (tmp_path / "decode_accuracy.png").exists()
  assert accuracy.method_of("tidal_2048", {}).name == "tidal"
