"""Post-hoc analysis of trained detectors (what a model relies on, what distillation transferred).

Kept apart from ``distill/`` (training-time KD): nothing here is imported by training.
``analysis.knowledge`` (a package, one module per stage): per-cell input entropy and visual-concept
counts after Cheng et al., "Explaining Knowledge Distillation by Quantifying the Knowledge" (CVPR 2020).
"""
