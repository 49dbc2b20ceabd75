"""How close does the worker's GPU path get to its models' own speed, with realistic models?

One run, one device, one batch size, the project's own model factory
(:func:`~streamfuse.models.encoders.create_model`, random weights: nothing is downloaded)
and the worker's own preprocessing (:func:`~streamfuse.models.preprocess.batch_tensor`):

- image: timm ``resnet50`` at 224 px; camera JPEGs of 256 px decoded on the GPU in one
  batched nvJPEG call (``torchvision.io.decode_jpeg(list, device="cuda")``), resized and
  normalized there;
- audio: PCM16, one second at 16 kHz, log-mel (64 mels, 32 ms window, 10 ms hop) on the
  device, then a timm ``resnet18`` with one input channel;
- series: float32, 3 channels x 1024 steps (a tri-axial vibration window), ResNet-1D;
- fusion: UME (:func:`~streamfuse.models.fusion.ume`), the default mode.

Measured, at the same batch size:

1. ``model_only_sps`` -- the three models' forward passes (+ softmax) on batches already
   on the device: the ceiling;
2. ``full_sps`` -- raw bytes (JPEG, PCM16, float32) -> decode / preprocess -> models ->
   fusion -> per-modality and fused probabilities on the host. Audio and series are
   decoded on the CPU and copied from pinned memory with ``non_blocking=True``.
   ``ratio = full_sps / model_only_sps``. Each batch's time is split into stages
   (``decode``, ``copy``, ``compute`` = models + fusion, ``to_host``), with the device
   synchronized at every stage boundary (the worker waits for each modality's outputs
   anyway); ``p50_ms`` / ``p99_ms`` are per-batch latencies of the full path.

Process CPU time per sample is reported for both (``model_cpu_ms``, ``full_cpu_ms``); on
CUDA it includes the host thread spin-waiting in ``torch.cuda.synchronize``.

bf16 autocast on CUDA by default (``--dtype fp32`` for full precision); ``--compile``
serves each model through ``torch.compile``, ``--cuda-graphs`` through
``torch.compile(mode="reduce-overhead")`` (CUDA graphs; implies ``--compile``). Without
CUDA (or with ``--device cpu``) it runs the same path on the CPU -- JPEGs decoded by
torchvision on the CPU, fp32, models served as the worker serves them there (TorchScript
traces) -- and says so. ``--tiny`` swaps in small models and inputs (a smoke test);
``--threads N`` sets torch's intra-op threads (default: one per core).

On a GPU machine:

    .venv/bin/python bench/gpu_worker.py --device cuda --duration 30 --json out/gpu_worker.json
    .venv/bin/python bench/gpu_worker.py --device cuda --cuda-graphs --json out/gpu_worker_graphs.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import encode_jpeg

from streamfuse.errors import ModelError
from streamfuse.events import SensorEvent
from streamfuse.models.config import ModalityConfig, default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.fusion import ume
from streamfuse.models.preprocess import CPU, _to_device, batch_tensor, example_input
from streamfuse.models.runtime import Forward, autocast, resolve_device, served_forward
from report import emit, machine

MODALITIES = ("image", "audio", "series")
STAGES = ("decode", "copy", "compute", "to_host")
POOL_BATCHES = 4  # distinct synthetic batches, cycled
MIN_BATCHES = 3  # timed batches per phase, however short --duration is
PRESETS: dict[str, dict[str, Any]] = {
    "realistic": {"image_arch": "resnet50", "image_size": 224, "jpeg_size": 256, "audio_arch": "resnet18",
                  "sample_rate": 16000, "n_mels": 64, "series_arch": "sf_resnet1d", "series_len": 1024,
                  "series_channels": 3},
    "tiny": {"image_arch": "test_resnet", "image_size": 32, "jpeg_size": 48, "audio_arch": "test_resnet",
             "sample_rate": 8000, "n_mels": 32, "series_arch": "sf_series_cnn", "series_len": 256,
             "series_channels": 1},
}
Batch = dict[str, list[SensorEvent]]  # modality -> one batch of its readings


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype on CUDA (CPU: fp32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of each timed phase")
    ap.add_argument("--compile", action="store_true", help="serve the models through torch.compile")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA graphs via torch.compile(mode='reduce-overhead'); implies --compile")
    ap.add_argument("--tiny", action="store_true", help="small models and inputs (smoke test)")
    ap.add_argument("--classes", type=int, default=4, help="number of classes of every model")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: one per core)")
    realistic = PRESETS["realistic"]
    for name, kind in (("image_arch", str), ("image_size", int), ("jpeg_size", int), ("audio_arch", str),
                       ("sample_rate", int), ("n_mels", int), ("series_arch", str), ("series_len", int),
                       ("series_channels", int)):
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                        help=f"default {realistic[name]!r} ({PRESETS['tiny'][name]!r} with --tiny)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for name, value in PRESETS["tiny" if args.tiny else "realistic"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch < 2:
        ap.error("--batch must be at least 2 (a batch of one JPEG is not decoded in a GPU batch)")
    return args


def model_configs(args: argparse.Namespace) -> dict[str, ModalityConfig]:
    """The three modalities' configs; the log-mel front end uses a 32 ms window, 10 ms hop."""
    classes = tuple(f"class{i}" for i in range(args.classes))
    sr = args.sample_rate
    return {
        "image": default_config("image", classes, arch=args.image_arch, image_size=args.image_size),
        "audio": default_config("audio", classes, arch=args.audio_arch, sample_rate=sr, clip_samples=sr,
                                n_fft=round(0.032 * sr), hop_length=round(0.010 * sr), n_mels=args.n_mels),
        "series": default_config("series", classes, arch=args.series_arch, series_len=args.series_len,
                                 in_channels=args.series_channels),
    }


def synthetic_batches(cfgs: dict[str, ModalityConfig], jpeg_size: int, batch: int, seed: int = 0) -> list[Batch]:
    """``POOL_BATCHES`` batches of raw readings, as they arrive from Kafka: smooth random
    colour fields with noise as JPEG (quality 90; pure noise would not compress like a
    camera frame), noisy PCM16 tones, Gaussian float32 windows."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    audio, series = cfgs["audio"], cfgs["series"]
    t = np.arange(audio.clip_samples) / audio.sample_rate
    out: list[Batch] = []
    for b in range(POOL_BATCHES):
        readings: Batch = {m: [] for m in MODALITIES}
        for i in range(batch):
            eid = f"b{b}-{i}"
            coarse = torch.rand((1, 3, 6, 6), generator=gen) * 255
            img = F.interpolate(coarse, size=(jpeg_size, jpeg_size), mode="bilinear", align_corners=False)[0]
            img = (img + torch.randn(img.shape, generator=gen) * 12).clamp(0, 255).to(torch.uint8)
            jpeg = encode_jpeg(img, quality=90).numpy().tobytes()
            readings["image"].append(SensorEvent(eid, "a1", "image", 0, jpeg, encoding="jpeg"))
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(50, 2000) * t) + rng.normal(0, 0.05, t.size)
            pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
            readings["audio"].append(SensorEvent(eid, "a1", "audio", 0, pcm, encoding="pcm16le",
                                                 sample_rate=audio.sample_rate, channels=1))
            shape = (series.in_channels, series.series_len)
            values = rng.standard_normal(shape).astype("<f4").tobytes()
            readings["series"].append(SensorEvent(eid, "a1", "series", 0, values, encoding="float32le", shape=shape))
        out.append(readings)
    return out


class StageClock:
    """Wall seconds per stage, summed over batches; the device is synchronized before each
    reading of the clock, so that a stage's asynchronous GPU work is charged to it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.total = dict.fromkeys(STAGES, 0.0)
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.total[stage] += now - self._t
        self._t = now

    def reset(self) -> None:
        self.total = dict.fromkeys(STAGES, 0.0)


class GpuPath:
    """The worker's path for one batch of every modality, stage by stage."""

    def __init__(self, cfgs: dict[str, ModalityConfig], device: torch.device, dtype: str, compiled: str | None) -> None:
        self.cfgs, self.device, self.compiled = cfgs, device, compiled
        self.amp: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: autocast(device)) if dtype == "bf16" else contextlib.nullcontext)
        self.forwards: dict[str, Forward] = {}
        for m, cfg in cfgs.items():
            model = create_model(cfg).eval().to(device)
            if compiled is None:  # as the worker serves it: traced on the CPU, eager on CUDA
                self.forwards[m] = served_forward(model, example_input(cfg, device))
            else:
                self.forwards[m] = torch.compile(model.forward_both, mode=compiled)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decode(self, readings: Batch) -> dict[str, torch.Tensor]:
        """JPEGs decode where the models run (nvJPEG on CUDA); audio and series on the CPU."""
        return {m: batch_tensor(cfg, readings[m], self.device if m == "image" else CPU) for m, cfg in self.cfgs.items()}

    def copy(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CPU batches to the device through pinned memory, asynchronously (the worker's copy)."""
        return {m: x if x.device == self.device else _to_device(x, self.device) for m, x in host.items()}

    def probs(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-modality class probabilities ``[B, M, C]`` float32 on the device."""
        if self.compiled == "reduce-overhead":  # a new step: the previous graphs' outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), self.amp():
            return torch.stack([self.forwards[m](x[m])[1].float().softmax(-1) for m in self.cfgs], dim=1)

    def full(self, readings: Batch, clock: StageClock) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw readings -> (per-modality probs ``[B, M, C]``, fused probs ``[B, C]``) on the host."""
        clock.start()
        host = self.decode(readings)
        clock.lap("decode")
        x = self.copy(host)
        clock.lap("copy")
        probs = self.probs(x)
        with torch.inference_mode():
            fused = ume(probs, torch.ones(probs.shape[:2], dtype=torch.bool, device=self.device))
        clock.lap("compute")
        out = probs.cpu(), fused.cpu()
        clock.lap("to_host")
        return out


def timed(step: Callable[[int], object], sync: Callable[[], None], duration: float,
          warmup: int, after_warmup: Callable[[], None] = lambda: None) -> tuple[list[float], float, float]:
    """Run ``step(i)`` ``warmup`` times, call ``after_warmup``, then run it for ``duration``
    seconds (at least ``MIN_BATCHES`` times). Returns per-step wall seconds, total wall
    seconds and process CPU seconds of the timed part."""
    for i in range(warmup):
        step(i)
    sync()
    after_warmup()
    latencies: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < duration or len(latencies) < MIN_BATCHES:
        start = time.perf_counter()
        step(len(latencies))
        sync()
        latencies.append(time.perf_counter() - start)
    return latencies, time.perf_counter() - t0, time.process_time() - c0


def describe(cfgs: dict[str, ModalityConfig], jpeg_size: int) -> str:
    img, aud, ser = cfgs["image"], cfgs["audio"], cfgs["series"]
    frames = aud.clip_samples // aud.hop_length + 1
    return (f"image {img.arch} @{img.image_size} px (JPEG {jpeg_size} px) | audio log-mel {aud.n_mels}x{frames} + "
            f"{aud.arch} | series {ser.arch} {ser.in_channels}x{ser.series_len} | fusion ume")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ModelError as exc:
        raise SystemExit(f"gpu_worker.py: {exc}") from None
    on_cuda = device.type == "cuda"
    if args.cuda_graphs and not on_cuda:
        raise SystemExit("gpu_worker.py: --cuda-graphs needs a CUDA device")
    dtype = args.dtype if on_cuda else "fp32"
    compiled = "reduce-overhead" if args.cuda_graphs else ("default" if args.compile else None)
    torch.manual_seed(0)
    try:
        cfgs = model_configs(args)
        path = GpuPath(cfgs, device, dtype, compiled)
    except ModelError as exc:
        raise SystemExit(f"gpu_worker.py: {exc}") from None
    gpu = torch.cuda.get_device_name(device) if on_cuda else None
    if on_cuda:
        print(f"device: {device} ({gpu}); JPEG decode on the GPU (nvJPEG, batched), {dtype}")
    else:
        why = "--device cpu" if args.device == "cpu" else "no CUDA available"
        print(f"device: cpu ({why}): CPU fallback, JPEG decode on the CPU (torchvision), fp32, "
              f"torch threads {torch.get_num_threads()}")
    print(f"models: {describe(cfgs, args.jpeg_size)}; batch {args.batch}, serving {compiled or 'as the worker'}")
    batches = synthetic_batches(cfgs, args.jpeg_size, args.batch)
    warmup = 3  # first calls: TorchScript optimizes its traces (CPU); cuDNN, compile, graph capture (CUDA)

    staged = path.copy(path.decode(batches[0]))
    path.sync()
    lat, wall, cpu = timed(lambda i: path.probs(staged), path.sync, args.duration, warmup)
    n = len(lat) * args.batch
    model_sps, model_cpu_ms = n / wall, 1000 * cpu / n
    print(f"model-only forward: {model_sps:9.1f} samples/s  ({len(lat)} batches, {1000 * wall / len(lat):.1f} ms "
          f"per batch, {model_cpu_ms:.2f} CPU-ms per sample)")

    clock = StageClock(path.sync)
    lat, wall, cpu = timed(lambda i: path.full(batches[i % POOL_BATCHES], clock), path.sync, args.duration,
                           warmup, after_warmup=clock.reset)
    n = len(lat) * args.batch
    full_sps, full_cpu_ms = n / wall, 1000 * cpu / n
    ratio = full_sps / model_sps
    p50, p99 = (float(v) for v in np.percentile(np.array(lat) * 1000, [50, 99]))
    stages = {s: 1000 * t / len(lat) for s, t in clock.total.items()}
    print(f"full path (bytes -> probs on host): {full_sps:9.1f} samples/s  ({len(lat)} batches, "
          f"{full_cpu_ms:.2f} CPU-ms per sample)")
    print(f"ratio = full / model-only = {ratio:.3f}")
    total = sum(stages.values())
    print("stages per batch: " + ", ".join(f"{s} {ms:.1f} ms ({100 * ms / total:.0f} %)" for s, ms in stages.items()))
    print(f"batch latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

    result = {
        "device": str(device),
        "gpu": gpu,
        "dtype": dtype,
        "decode": "nvjpeg" if on_cuda else "cpu",
        "serving": compiled or "worker",
        "batch": args.batch,
        "model_only_sps": round(model_sps, 1),
        "full_sps": round(full_sps, 1),
        "ratio": round(ratio, 3),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "stages": {s: round(ms, 2) for s, ms in stages.items()},
        "model_cpu_ms": round(model_cpu_ms, 3),
        "full_cpu_ms": round(full_cpu_ms, 3),
        "batches": len(lat),
        "duration_s": args.duration,
        "models": {m: cfg.to_dict() for m, cfg in cfgs.items()},
        "jpeg_size": args.jpeg_size,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cpu_threads": torch.get_num_threads(),
        **machine(),
    }
    emit(result, args.json, show=False)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
