"""Stage 5 of the pipeline: the client that generates text through Triton, character by character."""
