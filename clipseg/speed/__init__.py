"""Measuring speed for bench.py: timing, matmul rates and FLOP counts (timing), our model against the HF class
(models), the rows of a training run and of scoring (runs), the data pipeline and the PhraseCut index (data), and
whether the machine was busy while it measured (busy)."""
