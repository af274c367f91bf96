"""One training run: its device (`device`), its step (`step`), its checkpoints (`checkpoint`) and
the loop that trains and records it (`train`)."""
