"""The model worker: owns the model, runs batches of jobs."""
