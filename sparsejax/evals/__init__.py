"""Quality evaluations: loss comparisons across attention variants, needles.

  from sparsejax import evals
  runs = evals.compare.run_variants(lm.get_config,  # configs/lm.py
                                    evals.compare.loss_variants(), workdir)
  acc = evals.needle.needle_accuracy(predict_fn, lengths=[2048],
                                     depths=[0.0, 0.5, 1.0])
"""

from sparsejax.evals import compare
