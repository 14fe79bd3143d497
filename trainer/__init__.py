"""The RLHF trainer: one process per stage (SFT, reward model, PPO), run as ``python -m trainer``.

``trainer.config`` is the user-facing API; ``trainer.runtime.run_stage`` runs one stage.
"""
