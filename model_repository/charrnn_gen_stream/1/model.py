"""charrnn_gen_stream: server-side generation, the same model, decoupled by its config.pbtxt: one response per character as it is generated.

The code is charrnn/gen_model.py (initialize / execute / finalize), shared by charrnn_gen_python and
charrnn_gen_stream; Triton's python backend looks up the name TritonPythonModel in this file.
"""

from charrnn.gen_model import TritonPythonModel  # noqa: F401
