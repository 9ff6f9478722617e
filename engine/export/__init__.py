"""Deployment artefacts built from the models: TensorRT plans (tensorrt.py) and Triton model repositories (configs in
triton_config.py, the backbones' models in triton.py, the whole-segmentation model in triton_segment.py, and the
python-backend models they hold). This package imports the models, never the reverse, and only writes files; serving
a repository is engine.serving's. The deployer's scripts in the repository's top-level export/ are thin command lines
over it."""
