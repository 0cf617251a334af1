"""Training and packaging: the trainer (``qeq-train``), compiled training steps, evaluation
(``qeq-eval``), export of potential files (``qeq-export``) and the one-command fit (``qeq-fit``).
"""
