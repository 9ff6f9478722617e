"""A local tritonserver over a model repository that engine.export writes: its own venv (server_env.py, made by
triton_env.sh), the supervised server process (server.py) and the HTTP front that guards its port (guard.py).
`moduseg serve` and `moduseg triton-env` are thin command lines over it."""
