"""The one-shot and zero-shot benchmarks: readers, protocols, class lists and score.py's runs."""
