"""``python -m qeq_ase.train CONFIG [options]``: the same command as ``qeq-train``
(:func:`qeq_ase.train.trainer.main`; ``configs/experiments/gpu/run.sh`` runs it this way)."""

from .trainer import main

if __name__ == "__main__":
    main()
