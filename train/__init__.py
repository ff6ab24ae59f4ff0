"""Stage 1 of the pipeline: data -> trained TensorFlow model directory (train, evaluate, sample)."""
