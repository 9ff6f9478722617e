"""Deployment artefacts built from the models: TensorRT plans (tensorrt.py) and Triton model repositories with a
local server over them (triton.py). This package imports the models, never the reverse; the deployer's scripts in
the repository's top-level export/ are thin command lines over it."""
