"""The library every stage imports: vocabulary, tensor contract, model and its generate, sampling, the table of
served models, the python models' state store and generation code, the local Triton launcher, errors and CLI help.

Only `charrnn.model` imports TensorFlow; everything else needs NumPy (and ONNX Runtime or tritonclient where it
says so), so the python-backend models and the client stay light.
"""
