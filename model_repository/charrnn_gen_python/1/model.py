"""charrnn_gen_python: server-side generation, K characters per request, in one response.

The code is charrnn/gen_model.py (initialize / execute / finalize), shared by charrnn_gen_python and
charrnn_gen_stream; Triton's python backend looks up the name TritonPythonModel in this file.
"""

from charrnn.gen_model import TritonPythonModel  # noqa: F401
