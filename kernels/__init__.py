"""keyedge's CUDA kernel sources, shipped as the data package ``keyedge.share.kernels``
(see ``keyedge/core/resources.py``); the Python loader is ``keyedge.runtime.kernel``."""
