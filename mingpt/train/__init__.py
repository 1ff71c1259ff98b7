"""Training: the loop and its steps (loop), what a run holds and how it is set up, saved and resumed
(state), the learning-rate schedule (schedule), evaluation during training (evaluation) and the run's
record, run.json (records). `python -m mingpt.train` is the command (__main__)."""
