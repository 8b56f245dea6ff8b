"""Training: the run session (run directory, logs, checkpoints, resume, stop votes) and the loops over it
(end-to-end backprop in `loop.py`, the local-learning pipeline in `local_loop.py`), checkpointing."""
