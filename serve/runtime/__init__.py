"""The python-backend runtime: what the python models' model.py files run on inside Triton's stub.

  - `sequence_state`: each sequence's recurrent state (the python backend has no implicit state), the config and
    model.onnx checks of initialize(), the request-id checks, the custom metrics;
  - `gen_serving`: the generation models' request checks, batching and K-character runs (NumPy + ONNX Runtime);
  - `gen_model`: what charrnn_gen_python's and charrnn_gen_stream's TritonPythonModel share (load, parse, respond).

The model.py files import it by its installed name, charrnn_serve.runtime (pyproject.toml: serve/ installs as
charrnn_serve; the nvidia-pytriton wheel's python backend stub runs Python isolated, PYTHONPATH unread, so it
finds what the environment has installed: `make setup`'s editable install, or the copy the server images put next
to charrnn/ in serve/Dockerfile and serve/Dockerfile.slim); a checkout's tests and tools import it as serve.runtime. It imports NumPy, onnxruntime
and the library (charrnn.contract, charrnn.onnx_runtime), never the rest of serve/ (the launcher and psutil stay
out). Free of Triton's pb_utils: the model.py files pass the triton_python_backend_utils module they imported, so
the tests call everything here directly.
"""
