"""TensorRT runner: deserialise an engine, ``execute_async_v3`` on a stream, optional CUDA graph.

Device memory and streams come from cuda-python (``cuda.bindings.runtime``), or from
pycuda where cuda-python is absent. The engine's manifest is its sidecar
``<engine>.json`` (:class:`~keyedge.core.manifests.EngineManifest`). TensorRT and CUDA are
imported when the runner is activated; ``deactivate`` frees the device buffers, the
CUDA graph and the stream it created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import EngineManifest, engine_manifest_path
from ..bundle import SealedLoader
from ..platform import import_tensorrt, local_gpu_capability, local_l4t_release
from .base import Runner, graph_feed


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

    def destroy_stream(self, stream: Any) -> None:
        if self.cudart:
            self.cudart.cudaStreamDestroy(stream)  # pycuda streams free themselves

    def destroy_graph(self, graph_exec: Any) -> None:
        if self.cudart and graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(graph_exec)


def _version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0' or trtexec's '100300' -> (10, 3, 0)."""
    if version.isdigit() and len(version) >= 5:
        v = int(version)
        return (v // 10000, v // 100 % 100, v % 100)
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_engine_identity(manifest: EngineManifest, tensorrt_version: str, capability: str | None,
                          where: str, l4t_release: str | None = None) -> None:
    """Refuse, in one line, an engine built for another TensorRT, GPU or Jetson Linux release (before
    TensorRT would fail with 'Serialization assertion ... Version tag does not match')."""
    built = manifest.tensorrt_version
    if built and built != "unknown" and _version_tuple(built)[:3] != _version_tuple(tensorrt_version)[:3]:
        raise KeyedgeError(f"{where} was built with TensorRT {'.'.join(map(str, _version_tuple(built)))}, "
                           f"this machine has TensorRT {tensorrt_version}: rebuild it here (build_engine.sh)")
    if manifest.compute_capability and capability and manifest.compute_capability != capability:
        raise KeyedgeError(f"{where} was built for a GPU of compute capability {manifest.compute_capability}, "
                           f"this GPU is {capability}: rebuild it on the target")
    if manifest.l4t_release and l4t_release and manifest.l4t_release != l4t_release:
        raise KeyedgeError(f"{where} was built on Jetson Linux {manifest.l4t_release}, this device runs "
                           f"{l4t_release}: rebuild it on the target")


class TensorRTRunner(Runner):
    manifest: EngineManifest

    def __init__(self, path: str | Path, key: Key | None = None, *, cuda_graph: bool = False,
                 manifest: EngineManifest | None = None, sealed: SealedLoader | None = None) -> None:
        super().__init__(sealed)  # a sealed engine: opened in memory at activation, wiped once deserialized
        self.path = Path(path)
        if not self.path.is_file():
            raise KeyedgeError(f"engine {self.path} does not exist")
        self.manifest = manifest or EngineManifest.read(engine_manifest_path(self.path))
        self.input_spec = self.manifest.input
        self._check_key(key, f"engine {self.path}")
        self.cuda_graph = cuda_graph
        self.name = "tensorrt" + ("-graph" if cuda_graph else "")
        self.engine: Any = None
        self.context: Any = None
        self.runtime: Any = None
        self.cuda: _CudaRuntime | None = None
        self.stream: Any = None
        self.buffers: dict[str, tuple[Any, int]] = {}
        self.graph_exec: Any = None

    def _activate(self) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = _CudaRuntime()
        check_engine_identity(self.manifest, trt.__version__, local_gpu_capability(), str(self.path),
                              local_l4t_release())
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.sealed is None:
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        else:
            bundle = self._open(f"engine {self.path}")
            try:
                with bundle.plain.view(bundle.model_name) as blob:  # no copy
                    self.engine = self.runtime.deserialize_cuda_engine(blob)
            finally:
                bundle.wipe()
        if self.engine is None:
            raise KeyedgeError(f"TensorRT could not load {self.path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()

    def _deactivate(self) -> None:
        cuda = self.cuda
        if cuda is not None:
            self._drop_graph()
            for mem, _ in self.buffers.values():
                cuda.free(mem)
            if self.stream is not None:
                cuda.destroy_stream(self.stream)
        self.buffers.clear()
        self.stream = self.context = self.engine = self.runtime = self.cuda = None

    def _drop_graph(self) -> None:
        if self.cuda is not None:
            self.cuda.destroy_graph(self.graph_exec)
        self.graph_exec = None

    def _buffer(self, name: str, nbytes: int) -> Any:
        assert self.cuda is not None
        mem, size = self.buffers.get(name, (None, 0))
        if size < nbytes:
            if mem is not None:
                self.cuda.free(mem)
            mem = self.cuda.malloc(nbytes)
            self.buffers[name] = (mem, nbytes)
            self._drop_graph()  # addresses changed: capture again
        return mem

    def infer(self, images: np.ndarray) -> np.ndarray:
        assert self.cuda is not None
        trt, m = self.trt, self.manifest
        images = graph_feed(images, m, self.key)
        in_name, out_name = m.graph_input.name, m.output.name
        if tuple(self.context.get_tensor_shape(in_name)) != images.shape:
            self.context.set_input_shape(in_name, images.shape)
            self._drop_graph()  # the batch changed: capture again
        feeds = {in_name: images}
        if m.key_input:
            assert self.key is not None  # checked_key
            feeds[m.key_input] = np.ascontiguousarray(self.key.perm, dtype=np.int64)
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
        """Capture enqueueV3 into a CUDA graph once per shape and buffer set, then replay it."""
        assert self.cuda is not None
        cuda, cudart = self.cuda, self.cuda.cudart
        if self.graph_exec is None:
            if not self.context.execute_async_v3(cuda.handle(self.stream)):  # allocations outside capture
                raise KeyedgeError("TensorRT execution failed")
            cuda._check(cudart.cudaStreamBeginCapture(
                self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            self.context.execute_async_v3(cuda.handle(self.stream))
            graph = cuda._check(cudart.cudaStreamEndCapture(self.stream))
            try:
                self.graph_exec = cuda._check(cudart.cudaGraphInstantiate(graph, 0))
            finally:
                cudart.cudaGraphDestroy(graph)
        cuda._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))
