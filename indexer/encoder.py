"""Turn batches of pixels into descriptors, on CUDA with torch or on the CPU with ONNX Runtime."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from .backbone import BackboneError, layer_names, resolve_weights
from .errors import first_line
from .pooling import l2n, pool
from .recipe import Recipe

log = logging.getLogger(__name__)

ONNX_OPSET = 17


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. Resolved once, at the edge."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return device
    if device == "auto" and sys.platform.startswith("linux") and not os.path.exists(
            "/proc/driver/nvidia/version"):
        # No NVIDIA driver: no CUDA, and no need to spend a second importing torch.
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")


def cache_dir() -> Path:
    """Where exported ONNX graphs are kept ($LOOKALIKE_CACHE or the user cache dir)."""
    env = os.environ.get("LOOKALIKE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lookalike"))


class Encoder:
    """Descriptors for batches of equally sized uint8 RGB images (N x H x W x 3).

    Thread-safe: one instance can serve many threads. ``engine`` "auto" picks
    ONNX Runtime on the CPU (about 3x faster than eager PyTorch there) and
    torch on CUDA; "torch" forces PyTorch. ``threads``: ONNX Runtime's thread pool
    (default: every CPU of the machine; a Ray actor owns fewer).
    """

    def __init__(self, recipe: Recipe, weights_file: str | os.PathLike | None = None,
                 device: str = "cpu", engine: str = "auto", threads: int | None = None):
        path, sha = resolve_weights(recipe.model, weights_file, recipe.weights_sha256)
        if sha != recipe.weights_sha256:
            raise_mismatch(recipe, sha, given=weights_file is not None)
        self.recipe, self.device = recipe, device
        self._lock = threading.Lock()
        self._session = None
        self._net = None
        if engine not in ("auto", "torch"):
            raise ValueError(f"unknown engine {engine!r}; use auto or torch")
        if device == "cpu" and engine == "auto":
            try:
                self._session = _onnx_session(recipe, path, threads)
            except BackboneError:
                raise
            except Exception as exc:  # noqa: BLE001 - fall back to torch, which always works
                log.warning("ONNX Runtime unavailable (%s); using PyTorch on the CPU",
                            first_line(exc))
        if self._session is None:
            import torch

            from .network import build_trunk

            net = build_trunk(recipe.model, recipe.layer, path)
            if device.startswith("cuda"):
                net = net.to(device, memory_format=torch.channels_last)
            self._net = net
        self.engine = "onnxruntime" if self._session is not None else f"torch-{device}"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """float32 N x dim, L2-normalised, for uint8 pixels N x H x W x 3.

        Each stage of the recipe's layer is pooled and L2-normalised, the
        stages concatenated (equal weight), the scales summed, and the sum
        L2-normalised.
        """
        if pixels.ndim == 3:
            pixels = pixels[None]
        total = None
        for scale in self.recipe.scales:
            x = pixels if scale == 1.0 else _rescale(pixels, scale)
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
            if self._session is not None:
                fmaps = self._session.run(None, {"pixels": x})
            else:
                fmaps = self._forward(x)
            parts = [pool(f, self.recipe.pooling, self.recipe.gem_p or 3.0) for f in fmaps]
            v = parts[0] if len(parts) == 1 else l2n(np.concatenate(parts, axis=1))
            total = v if total is None else total + v
        return l2n(total).astype(np.float32)

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        t = torch.from_numpy(x)
        with torch.inference_mode():
            if self.device.startswith("cuda"):
                t = t.pin_memory().to(self.device, non_blocking=True)
                t = t.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self._net(t)
            else:
                with self._lock:  # torch CPU modules share scratch state between calls
                    out = self._net(t)
            out = out if isinstance(out, tuple) else (out,)
            return [f.float().cpu().numpy() for f in out]


def _rescale(pixels: np.ndarray, scale: float) -> np.ndarray:
    """The images of a batch resized by ``scale`` (antialiased, as decoding resizes)."""
    from PIL import Image

    h, w = pixels.shape[1:3]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BICUBIC,
                                                          reducing_gap=3.0)) for p in pixels])


def raise_mismatch(recipe: Recipe, sha: str, given: bool = True) -> None:
    from .backbone import tuned_weights_file
    from .recipe import RecipeMismatch

    tuned = "" if given else f", and {tuned_weights_file(recipe.model, recipe.weights_sha256)} is not there"
    raise RecipeMismatch(
        f"the {recipe.model} weights found here (sha256 {sha[:12]}) are not the ones the index "
        f"was built with ({recipe.weights_sha256[:12]}){tuned}; pass the original file with --weights"
    )


def _onnx_session(recipe: Recipe, weights_file: Path, threads: int | None = None):
    path = cache_dir() / f"{recipe.model}-{recipe.layer}-{recipe.weights_sha256[:16]}-op{ONNX_OPSET}.onnx"
    if path.exists():
        try:
            return _load_onnx(path, threads)
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is only a cache
            log.warning("the cached model %s is unusable (%s); exporting it again", path,
                        first_line(exc))
    try:
        _export(recipe, weights_file, path)
    except OSError as exc:
        # A read-only or full cache folder must not stop a query: export to a
        # temporary folder for this process only.
        log.warning("cannot write the model cache in %s (%s); using a temporary copy",
                    path.parent, exc.strerror or exc)
        with tempfile.TemporaryDirectory(prefix="lookalike-onnx-") as tmp:
            path = Path(tmp) / path.name
            _export(recipe, weights_file, path)
            return _load_onnx(path, threads)
    return _load_onnx(path, threads)


def _remove_orphans(path: Path) -> None:
    """Delete temporary exports of ``path`` left by processes that were killed."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:-4])
            os.kill(pid, 0)  # still exporting: leave it
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass


def _load_onnx(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3
    # Idle threads sleep instead of spinning after each run: spinning, they kept the cores
    # from FAISS's threads, and a search right after a forward pass took 8 ms instead of
    # a few hundredths; the forward pass costs 2 ms more (bench/RESULTS.md, run 6).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _export(recipe: Recipe, weights_file: Path, path: Path) -> None:
    """Export the trunk once to ONNX, check it against torch, then move it into place."""
    import onnxruntime as ort
    import torch

    from .network import build_trunk

    log.info("exporting %s/%s to ONNX at %s", recipe.model, recipe.layer, path)
    net = build_trunk(recipe.model, recipe.layer, weights_file)
    outputs = [f"features_{name}" for name in layer_names(recipe.layer)]
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sample = torch.rand(1, 3, 96, 128) * 255
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (sample,), str(tmp), input_names=["pixels"], output_names=outputs,
                dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"},
                              **{o: {0: "n", 2: f"{o}_h", 3: f"{o}_w"} for o in outputs}},
                opset_version=ONNX_OPSET, dynamo=False,
            )
        check = torch.rand(2, 3, 160, 120) * 255
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"pixels": check.numpy()})
        with torch.inference_mode():
            want = net(check)
        want = want if isinstance(want, tuple) else (want,)
        err = max(float(np.abs(g - w.numpy()).max() / (np.abs(w.numpy()).max() + 1e-12))
                  for g, w in zip(got, want))
        if err > 1e-3:
            raise RuntimeError(f"exported graph disagrees with torch (relative error {err:.2g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
