"""The t240dist Optuna sweeper, a Hydra plugin: see optuna_sweeper.py."""
