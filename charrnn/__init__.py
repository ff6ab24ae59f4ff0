"""Shared core of the project: vocabulary, tensor contract, model definition, sampling.

Only `charrnn.model` and `charrnn.train_loop` import TensorFlow; everything else is NumPy-only so the
python-backend model and the client stay light.
"""
