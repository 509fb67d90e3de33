"""The training loop: the parts built in order (build), one step as timed phases (step), the run that owns them
(trainer), evaluation between steps, checkpoints, and what a run records (metrics, observe)."""
