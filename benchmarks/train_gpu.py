"""GPU training check for a maintainer with one NVIDIA GPU: unattended, from a clean clone.

    bash scripts/gpu_check.sh            # installs (scripts/setup.sh), then runs this; ~5 min on a recent GPU
    python -m benchmarks.train_gpu       # the check alone, in an installed environment

1. Speed, in float16 and in bfloat16 (bfloat16 skipped, and said so, on GPUs without it): resnet50 at
   224 px with autocast and channels_last. Ours is trainer.engine.run_training (the `imlt train`
   loop: a DataLoader decoding and augmenting generated 224 px images, Linear/BN neck, ArcFace,
   SGD, train.deterministic=false so cuDNN autotunes as timm does). The baseline is timm's own
   train benchmark (benchmark.py of the installed timm version, fetched from timm's GitHub tag
   once and cached; random tensors already on the GPU, plain classifier head) at the same batch
   size on the same card. Ours includes reading the images, so its ratio is a lower bound of the
   trainer's own overhead; the loader workers used are printed.
2. The fp16 non-finite guard: a float16 run at an absurd learning rate must stop with
   NonFiniteLossError naming epoch, batch and step, before a step with that loss is applied.

Writes the train_gpu section of benchmarks/RESULTS.md; exits 1 if the guard did not trigger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import _common as C

MODULE = "benchmarks.train_gpu"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imlt" / "timm-benchmark"


def timm_benchmark_script() -> Path:
    """benchmark.py of the installed timm version (not shipped in timm's wheel, so fetched from its tag)."""
    import timm

    path = CACHE / f"benchmark-{timm.__version__}.py"
    if not path.exists():
        url = f"https://raw.githubusercontent.com/huggingface/pytorch-image-models/v{timm.__version__}/benchmark.py"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text = r.read()
        except OSError as e:
            sys.exit(f"benchmarks.train_gpu: cannot fetch timm's benchmark script from {url} ({e}); "
                     f"put that file at {path} and run again")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
    return path


def timm_train_rate(dtype: str, batch: int, image_size: int) -> float:
    """timm benchmark.py --bench train: its train_samples_per_sec (the JSON after its `--result` line)."""
    cmd = [sys.executable, str(timm_benchmark_script()), "--bench", "train", "--model", "resnet50",
           "--img-size", str(image_size), "-b", str(batch), "--amp", "--amp-dtype", dtype, "--channels-last"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode or "--result" not in out.stdout:
        sys.exit(f"benchmarks.train_gpu: timm's benchmark failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.split("--result", 1)[1])
    if "train_samples_per_sec" not in result:
        sys.exit(f"benchmarks.train_gpu: timm's benchmark gave no train_samples_per_sec: {result}")
    return float(result["train_samples_per_sec"])


def _config(out: str, *, dtype: str, batch: int, image_size: int, epochs: int, workers: int, lr: float) -> Any:
    from imlt.trainer.config import validate_config

    return validate_config({
        "output_dir": out,
        "data": {"image_size": image_size, "reader_threads": workers},
        "model": {"backbone": "resnet_50", "feature_dim": 512},
        "loss": {"name": "ArcFace"},
        "optim": {"optimizer": "SGD", "lr": lr, "scheduler": "cosine"},
        "train": {"batch_size": batch, "epochs": epochs, "checkpoint_every": epochs, "device": "cuda", "fp16": True,
                  "amp_dtype": dtype, "channels_last": True, "deterministic": False},
    })


def our_train_rate(dataset: str, out: str, *, dtype: str, batch: int, image_size: int, epochs: int, workers: int) -> float:
    """Steady-state images/s of run_training (first epoch left out: cuDNN autotuning, worker start)."""
    from benchmarks.train_overhead import steady_rate
    from imlt.trainer.engine import run_training
    from imlt.trainer.steps import TrainInput

    cfg = _config(out, dtype=dtype, batch=batch, image_size=image_size, epochs=epochs, workers=workers, lr=0.05)
    return steady_rate(run_training(TrainInput(config=cfg, train_dataset=dataset, resume=False)).history)


def fp16_guard(dataset: str, out: str, *, image_size: int, workers: int) -> str:
    """The error a float16 run at lr 1e8 stops with ("" if it trained through: the guard failed)."""
    from imlt.trainer.engine import NonFiniteLossError, run_training
    from imlt.trainer.steps import TrainInput

    cfg = _config(out, dtype="float16", batch=32, image_size=image_size, epochs=2, workers=workers, lr=1e8)
    try:
        run_training(TrainInput(config=cfg, train_dataset=dataset, resume=False))
    except NonFiniteLossError as e:
        return str(e)
    return ""


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--per-class", type=int, default=64, help="Generated images per class (60 classes)")
    p.add_argument("--epochs", type=int, default=3, help="Epochs of our trainer per dtype; the first is not counted")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 1, at most 8)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.train_gpu: torch sees no CUDA device; run it on a machine with an NVIDIA GPU")
    from benchmarks.train_overhead import prepare_datasets
    from imlt.trainer.device import available_cpus

    if args.quick:
        args.per_class, args.epochs = 8, 2
    workers = args.workers if args.workers is not None else max(1, min(8, int(available_cpus()) - 1))
    started = time.monotonic()
    info = C.machine_info("cuda")
    dtypes = ["float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    rows, headlines = [], []
    with tempfile.TemporaryDirectory(prefix="imlt-bench-gpu-") as tmp:
        C.console.print(f"[cyan]generating {60 * args.per_class} glyph images at {args.image_size} px[/]")
        dataset, _ = prepare_datasets(Path(tmp), args.per_class, args.image_size)
        for dtype in dtypes:
            C.console.print(f"[cyan]{dtype}: timm's train benchmark[/]")
            theirs = timm_train_rate(dtype, args.batch_size, args.image_size)
            C.console.print(f"[cyan]{dtype}: our trainer ({workers} loader workers)[/]")
            ours = our_train_rate(dataset, str(Path(tmp, f"run-{dtype}")), dtype=dtype, batch=args.batch_size,
                                  image_size=args.image_size, epochs=args.epochs, workers=workers)
            rows.append([dtype, f"{ours:.0f}", f"{theirs:.0f}", C.ratio(ours, theirs)])
            headlines.append(f"{dtype}: our trainer at {C.ratio(ours, theirs)} of timm's train benchmark "
                             f"({ours:.0f} vs {theirs:.0f} images/s, resnet50 @ {args.image_size} px, batch {args.batch_size}).")
        if "bfloat16" not in dtypes:
            headlines.append(f"bfloat16: not measured, {torch.cuda.get_device_name(0)} has no bfloat16 support.")
        C.console.print("[cyan]fp16 non-finite guard (lr 1e8)[/]")
        error = fp16_guard(dataset, str(Path(tmp, "guard")), image_size=args.image_size, workers=workers)
    guard = (f"fp16 non-finite guard: triggered, \"{error.splitlines()[0][:200]}\"" if error
             else "fp16 non-finite guard: NOT triggered (a float16 run at lr 1e8 trained through)")
    headlines.append(guard)
    columns = ["autocast dtype", "ours images/s", "timm benchmark images/s", "ours vs timm"]
    C.print_table("GPU training throughput", columns, rows)
    body = (f"Work: resnet50 at {args.image_size} px, batch {args.batch_size}, autocast + channels_last. Ours: "
            f"{60 * args.per_class} generated glyph images decoded and augmented by {workers} DataLoader workers, "
            f"Linear/BN neck to 512-d, ArcFace, SGD, {args.epochs} epochs, first not counted, cuDNN autotuning on. "
            f"timm: its benchmark.py --bench train (random tensors on the GPU, classifier head), timm "
            f"{info.get('timm', '')}.\n\n" + C.markdown_table(columns, rows))
    C.report(args, MODULE, "train_gpu", "GPU training: our trainer vs timm's train benchmark", headlines, body,
             info=info, started=started)
    if not error:
        sys.exit(1)


if __name__ == "__main__":
    main()
