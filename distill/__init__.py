"""Teacher -> student distillation: synthetic data, logit KD, on-policy KD (GKD), students.

- ``synth``/``filters``: self-instruct data written by a teacher on our engine, filtered, with lineage
  (``python launch/generate.py config=synth.yaml``);
- ``losses``: registered KD divergences (forward/reverse KL, generalized JSD) and the chunked driver;
- ``teacher``: final hidden states, the online teacher, the offline top-k cache;
- ``students``: layer-pruned warm starts, the vocabulary check;
- ``kd``: ``DistillMethod`` (``train.method=distill``), ``evaluate``: student vs teacher through the engine.
"""
