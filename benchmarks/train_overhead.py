"""Training overhead: images/s of our trainer vs a minimal hand-written loop on identical work.

    python -m benchmarks.train_overhead                     # resnet18, 32 px glyphs, batch 32
    python -m benchmarks.train_overhead --image-size 64 --epochs 5 --repeats 3

Same images (a read_data folder of generated glyphs), same transform
(trainer.data.transforms.build_train_transform), same network (timm backbone + Linear +
BatchNorm1d + L2 normalisation), same loss (ArcFace, PML), same optimiser (SGD momentum, cosine
schedule), same batch size, DataLoader workers and epochs. Ours is trainer.engine.run_training,
the function behind `imlt train` (seeded per-sample augmentation streams, NaN guard, progress,
checkpoint at the end). The bare loop is the few lines a user would write: a Dataset that opens
each file with PIL, a shuffling DataLoader, forward, backward, step.

Start-up is excluded: the first epoch of each run (worker start, allocator warm-up) is not
counted; images/s is averaged over the remaining epochs. Ours reports per-epoch images/s in
history.json; the bare loop times the same epochs the same way. Each run is a fresh process,
and ours/bare runs alternate, so drifting machine load hits both; the headline is the ratio of
the medians.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

MODULE = "benchmarks.train_overhead"


def prepare_dataset(root: Path, per_class: int, image_size: int) -> str:
    from imlt.trainer.data.synthetic import generate_glyphs
    from imlt.trainer.steps import ReadDataInput, read_data

    data = generate_glyphs(root / "glyphs", train_per_class=per_class, val_per_class=2, image_size=image_size)
    out = read_data(ReadDataInput(output_dir=str(root / "train_dataset"), annotations=data.train_annotations,
                                  class_names=data.train_classes))
    return out.dataset_dir


def _ours(spec: dict[str, Any]) -> list[float]:
    from imlt.trainer.config import validate_config
    from imlt.trainer.engine import run_training
    from imlt.trainer.steps import TrainInput

    cfg = validate_config({
        "output_dir": spec["output_dir"],
        "data": {"image_size": spec["image_size"], "reader_threads": spec["workers"]},
        "model": {"backbone": spec["backbone"], "feature_dim": spec["feature_dim"]},
        "loss": {"name": "ArcFace"},
        "optim": {"optimizer": "SGD", "lr": 0.05, "scheduler": "cosine"},
        "train": {"batch_size": spec["batch_size"], "epochs": spec["epochs"], "checkpoint_every": spec["epochs"],
                  "seed": spec["seed"], "device": spec["device"]},
    })
    out = run_training(TrainInput(config=cfg, train_dataset=spec["dataset"], resume=False))
    return [float(h["images_per_second"]) for h in out.history]


def _bare(spec: dict[str, Any]) -> list[float]:
    """The minimal loop, written as a user would; nothing from trainer/ except the transform."""
    import math

    import timm
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from pytorch_metric_learning.losses import ArcFaceLoss
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from imlt.trainer.data.manifest import read_classes, read_manifest
    from imlt.trainer.data.transforms import build_train_transform

    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    records = read_manifest(spec["dataset"])
    num_classes = len(read_classes(spec["dataset"]))

    class Files(Dataset):
        def __init__(self) -> None:
            self.items = [(r.uri, r.labels[0]) for r in records]
            self.transform = build_train_transform(spec["image_size"])

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, label = self.items[i]
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0)
            self.neck = nn.Sequential(nn.Linear(self.backbone.num_features, spec["feature_dim"]), nn.BatchNorm1d(spec["feature_dim"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.neck(self.backbone(x)), dim=1)

    model = Net().to(device)
    loss_fn = ArcFaceLoss(num_classes=num_classes, embedding_size=spec["feature_dim"], margin=28.6, scale=64).to(device)
    workers = spec["workers"]
    loader = DataLoader(Files(), batch_size=spec["batch_size"], shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4)
    total = spec["epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    speeds = []
    for _ in range(spec["epochs"]):
        model.train()
        images_seen = 0
        start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            float(loss)  # the loss is logged every step in any real loop (and ours checks it for NaN)
            images_seen += len(labels)
        speeds.append(images_seen / (time.perf_counter() - start))
    return speeds


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    speeds = _ours(spec) if spec["loop"] == "ours" else _bare(spec)
    return {"per_epoch": speeds}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=20, help="Glyph images per class (60 classes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="Epochs per run; the first is not counted")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (data.reader_threads)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run; on a shared box oversubscribed OpenMP threads slow torch 3-5x")
    p.add_argument("--feature-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="Runs of each loop, alternating")
    args = p.parse_args()
    if C.child_entry(args, child):
        return
    if args.quick:
        args.per_class, args.epochs, args.repeats = 6, 2, 1
    from imlt.trainer.config import timm_name

    started = time.monotonic()
    info = C.machine_info(args.device)
    runs: dict[str, list[float]] = {"ours": [], "bare": []}
    per_epoch: dict[str, list[list[float]]] = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="imlt-bench-train-") as tmp:
        C.console.print("[cyan]generating glyphs and reading them into a dataset folder[/]")
        dataset = prepare_dataset(Path(tmp), args.per_class, args.image_size)
        base = {
            "dataset": dataset, "image_size": args.image_size, "workers": args.workers, "backbone": args.backbone,
            "timm_name": timm_name(args.backbone), "feature_dim": args.feature_dim, "batch_size": args.batch_size,
            "epochs": args.epochs, "seed": 0, "device": args.device, "threads": args.threads,
        }
        for rep in range(args.repeats):
            for loop in ("ours", "bare") if rep % 2 == 0 else ("bare", "ours"):
                C.console.print(f"[cyan]run {rep + 1}/{args.repeats}: {loop}[/]")
                r = C.run_child(MODULE, {**base, "loop": loop, "output_dir": str(Path(tmp, f"run-{loop}-{rep}"))})
                steady = r["per_epoch"][1:] or r["per_epoch"]
                runs[loop].append(statistics.mean(steady))
                per_epoch[loop].append(r["per_epoch"])
    ours, bare = statistics.median(runs["ours"]), statistics.median(runs["bare"])
    columns = ["loop", "median images/s", "vs bare loop", "runs (steady-state images/s)", "per-epoch images/s of run 1"]
    rows = [
        ["ours (trainer.engine.run_training = imlt train)", f"{ours:.0f}", C.ratio(ours, bare),
         ", ".join(f"{v:.0f}" for v in runs["ours"]), ", ".join(f"{v:.0f}" for v in per_epoch["ours"][0])],
        ["bare loop (timm + PML + DataLoader)", f"{bare:.0f}", "1.00x",
         ", ".join(f"{v:.0f}" for v in runs["bare"]), ", ".join(f"{v:.0f}" for v in per_epoch["bare"][0])],
    ]
    C.print_table("Training throughput", columns, rows)
    spread = (max(runs["bare"]) - min(runs["bare"])) / bare if bare else 0.0
    headline = (f"Our trainer runs at {C.ratio(ours, bare)} the bare loop's images/s ({ours:.0f} vs {bare:.0f}; "
                f"run-to-run spread of the bare loop itself: {spread:.0%}).")
    n_images = 60 * args.per_class
    body = (
        f"Work: {args.backbone} + Linear/BN neck to {args.feature_dim}-d, ArcFace (PML), SGD momentum + cosine, "
        f"{n_images} generated glyph images ({args.image_size} px, 60 classes), batch {args.batch_size}, "
        f"{args.workers} DataLoader workers, {args.threads} torch threads, {args.epochs} epochs per run, first epoch not counted, "
        f"{args.repeats} alternating runs of each loop, each in a fresh process.\n\n"
        + C.markdown_table(columns, rows)
    )
    C.report(args, MODULE, "train", "Training overhead: our trainer vs a bare loop", [headline], body,
             info=info, started=started)


if __name__ == "__main__":
    main()
