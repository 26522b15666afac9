"""The edgeglm edge agent and the `edgeglm` command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeglm")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.2.0"

# the --device flag of the CLI commands that load a model (model.device in the config)
DEVICE_HELP = ("with a named --backend: the device to run on (OpenVINO: CPU, GPU, GPU.1, NPU; ONNX Runtime: CPU, CUDA, "
               "TensorRT or a provider name); default auto")
