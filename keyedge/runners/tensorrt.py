"""TensorRT runner: deserialise an engine, ``execute_async_v3`` on a stream, optional CUDA graph.

Device memory and streams come from cuda-python (``cuda.bindings.runtime``), or from
pycuda where cuda-python is absent. The engine's manifest is its sidecar
``<engine>.json``. TensorRT and CUDA are imported when the runner is activated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KeyedgeError
from ..keys import Key
from .base import Runner


class _CudaRuntime:
    """The few CUDA runtime calls the runner needs, over cuda-python or pycuda."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart

            self.cudart: Any = cudart
            self.pycuda: Any = None
        except ImportError:
            try:
                import pycuda.autoinit  # noqa: F401
                import pycuda.driver as cuda
            except ImportError:
                raise KeyedgeError("the TensorRT runner needs cuda-python or pycuda: pip install 'keyedge[gpu]'") from None
            self.cudart, self.pycuda = None, cuda

    def _check(self, result: tuple) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise KeyedgeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def stream(self) -> Any:
        return self._check(self.cudart.cudaStreamCreate()) if self.cudart else self.pycuda.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream) if self.cudart else stream.handle

    def malloc(self, nbytes: int) -> Any:
        return self._check(self.cudart.cudaMalloc(nbytes)) if self.cudart else self.pycuda.mem_alloc(nbytes)

    def ptr(self, mem: Any) -> int:
        return int(mem)

    def free(self, mem: Any) -> None:
        if self.cudart:
            self.cudart.cudaFree(mem)
        else:
            mem.free()

    def htod(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        if self.cudart:
            self._check(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        else:
            self.pycuda.memcpy_htod_async(dst, src, stream)

    def dtoh(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        if self.cudart:
            self._check(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        else:
            self.pycuda.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        if self.cudart:
            self._check(self.cudart.cudaStreamSynchronize(stream))
        else:
            stream.synchronize()


class TensorRTRunner(Runner):
    def __init__(self, path: str | Path, key: Key | None = None, *, cuda_graph: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise KeyedgeError(f"engine {self.path} does not exist")
        sidecar = self.path.with_name(self.path.name + ".json")
        if not sidecar.is_file():
            raise KeyedgeError(f"engine {self.path} has no manifest {sidecar.name} beside it")
        self.manifest = json.loads(sidecar.read_text())
        self.key_input = self.manifest.get("key_input")
        self.check_key(self.manifest, key, f"engine {self.path}", needs_key=self.needs_key(self.manifest))
        self.key, self.cuda_graph = key, cuda_graph
        self.name = "tensorrt" + ("-graph" if cuda_graph else "")
        self.engine: Any = None

    def activate(self) -> None:
        from ..tensorrt import import_tensorrt

        if self.engine is not None:
            return
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = _CudaRuntime()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise KeyedgeError(f"TensorRT could not load {self.path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        self.buffers: dict[str, tuple[Any, int]] = {}
        self.graph_exec: Any = None
        self.graph_shape: tuple[int, ...] | None = None

    def deactivate(self) -> None:
        if self.engine is None:
            return
        for mem, _ in self.buffers.values():
            self.cuda.free(mem)
        self.buffers.clear()
        self.context = self.engine = None

    def _buffer(self, name: str, nbytes: int) -> Any:
        mem, size = self.buffers.get(name, (None, 0))
        if size < nbytes:
            if mem is not None:
                self.cuda.free(mem)
            mem = self.cuda.malloc(nbytes)
            self.buffers[name] = (mem, nbytes)
            self.graph_exec = None  # addresses changed
        return mem

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.engine is None:
            self.activate()
        from ..onnx_export import graph_feed, graph_input_name

        trt = self.trt
        images = np.ascontiguousarray(graph_feed(images, self.manifest, self.key))
        in_name, out_name = graph_input_name(self.manifest), self.manifest["output"]["name"]
        if tuple(self.context.get_tensor_shape(in_name)) != images.shape:
            self.context.set_input_shape(in_name, images.shape)
            self.graph_exec = None
        feeds = {in_name: images}
        if self.key_input:
            assert self.key is not None  # checked in __init__
            feeds[self.key_input] = np.ascontiguousarray(self.key.perm, dtype=np.int64)
        for name, array in feeds.items():
            mem = self._buffer(name, array.nbytes)
            self.cuda.htod(mem, array, self.stream)
            self.context.set_tensor_address(name, self.cuda.ptr(mem))
        out_shape = tuple(self.context.get_tensor_shape(out_name))
        out = np.empty(out_shape, dtype=trt.nptype(self.engine.get_tensor_dtype(out_name)))
        out_mem = self._buffer(out_name, out.nbytes)
        self.context.set_tensor_address(out_name, self.cuda.ptr(out_mem))
        if self.cuda_graph and self.cuda.cudart is not None:
            self._launch_graph()
        elif not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise KeyedgeError("TensorRT execution failed")
        self.cuda.dtoh(out, out_mem, self.stream)
        self.cuda.sync(self.stream)
        return out.astype(np.float32)

    def _launch_graph(self) -> None:
        """Capture enqueueV3 into a CUDA graph once per shape/addresses, then replay it."""
        cudart = self.cuda.cudart
        if self.graph_exec is None:
            self.context.execute_async_v3(self.cuda.handle(self.stream))  # resource allocation outside capture
            self.cuda._check(cudart.cudaStreamBeginCapture(
                self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            self.context.execute_async_v3(self.cuda.handle(self.stream))
            graph = self.cuda._check(cudart.cudaStreamEndCapture(self.stream))
            self.graph_exec = self.cuda._check(cudart.cudaGraphInstantiate(graph, 0))
        self.cuda._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))
