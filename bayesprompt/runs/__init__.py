"""One run, from options to a run folder and back: options, model files, evaluation,
training, the run folder, sweeps, benchmark protocols and tables."""
