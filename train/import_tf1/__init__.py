"""Import a TF1 char-rnn (checkpoint or sampleCharRNN .wts) into a model directory: `python -m train.import_tf1`."""
