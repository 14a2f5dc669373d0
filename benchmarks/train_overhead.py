"""Training overhead: images/s of our trainer vs a minimal hand-written loop on identical work.

    python -m benchmarks.train_overhead                     # resnet18, 32 px glyphs, batch 32
    python -m benchmarks.train_overhead --image-size 64 --epochs 5 --repeats 3
    python -m benchmarks.train_overhead --threads 2 --validate   # both loops validate after every epoch

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
the medians, beside the median of each repeat's ours/bare ratio (the two runs of a repeat are
back to back, so that ratio also cancels load that drifts between repeats).

With --validate both loops measure the 26 unseen glyph classes after every epoch: ours through
train.val_dataset (the evaluate step's embedding and Recall@1/MAP@R code, history's
val_seconds), the bare loop by embedding the val files and taking Recall@1 from one matrix
product. Two ratios then: training images/s alone, and images per second of training plus
validation (what a user waits for).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

MODULE = "benchmarks.train_overhead"


def prepare_datasets(root: Path, per_class: int, image_size: int) -> tuple[str, str]:
    """(train, val) read_data folders: 60 glyph classes to train on, 26 unseen ones with half as many images."""
    from imlt.trainer.data.synthetic import generate_glyphs
    from imlt.trainer.steps import ReadDataInput, read_data

    data = generate_glyphs(root / "glyphs", train_per_class=per_class, val_per_class=max(per_class // 2, 2),
                           image_size=image_size)
    train = read_data(ReadDataInput(output_dir=str(root / "train_dataset"), annotations=data.train_annotations,
                                    class_names=data.train_classes))
    val = read_data(ReadDataInput(output_dir=str(root / "val_dataset"), annotations=data.val_annotations,
                                  class_names=data.val_classes, split="val"))
    return train.dataset_dir, val.dataset_dir


def steady_rate(epochs: list[dict[str, Any]], with_val: bool = False) -> float:
    """Steady-state images/s of one run (the first epoch left out), validation time included or not."""
    steady = epochs[1:] or epochs
    return sum(e["images"] for e in steady) / sum(e["seconds"] + ((e["val_seconds"] or 0) if with_val else 0) for e in steady)


def _ours(spec: dict[str, Any]) -> list[dict[str, float]]:
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
                  "seed": spec["seed"], "device": spec["device"], "validate_every": 1,
                  "threads": spec["threads"]},  # as many as the bare loop (the default would subtract the loader workers)
    })
    out = run_training(TrainInput(config=cfg, train_dataset=spec["dataset"], resume=False,
                                  val_dataset=spec["val"] if spec["validate"] else None))
    return [{"images": h["images"], "seconds": h["seconds"], "val_seconds": h.get("val_seconds") or 0.0} for h in out.history]


def _bare(spec: dict[str, Any]) -> list[dict[str, float]]:
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
    from imlt.trainer.data.transforms import build_eval_transform, build_train_transform

    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    num_classes = len(read_classes(spec["dataset"]))

    class Files(Dataset):
        def __init__(self, folder: str, transform: Any) -> None:
            self.items = [(r.uri, r.labels[0]) for r in read_manifest(folder)]
            self.transform = transform

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
    loader = DataLoader(Files(spec["dataset"], build_train_transform(spec["image_size"])), batch_size=spec["batch_size"],
                        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    val_loader = DataLoader(Files(spec["val"], build_eval_transform(spec["image_size"])), batch_size=spec["batch_size"],
                            num_workers=workers)

    def validate() -> float:
        """Recall@1 on the val split: embed, one similarity matrix, leave-one-out."""
        model.eval()
        with torch.no_grad():
            pairs = [(model(images.to(device)), labels) for images, labels in val_loader]
        emb, lab = torch.cat([e for e, _ in pairs]), torch.cat([y for _, y in pairs]).to(device)
        sim = emb @ emb.T
        sim.fill_diagonal_(-float("inf"))
        return float((lab[sim.argmax(1)] == lab).float().mean())

    optimizer = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4)
    total = spec["epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    epochs = []
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
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        if spec["validate"]:
            validate()
        epochs.append({"images": images_seen, "seconds": seconds, "val_seconds": time.perf_counter() - start})
    return epochs


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return {"per_epoch": _ours(spec) if spec["loop"] == "ours" else _bare(spec)}


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
    p.add_argument("--validate", action="store_true", help="Both loops validate on the unseen classes after every epoch")
    args = p.parse_args()
    if C.child_entry(args, child):
        return
    if args.quick:
        args.per_class, args.epochs, args.repeats = 6, 2, 1
    from imlt.trainer.config import timm_name

    started = time.monotonic()
    info = C.machine_info(args.device)
    epochs: dict[str, list[list[dict[str, float]]]] = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="imlt-bench-train-") as tmp:
        C.console.print("[cyan]generating glyphs and reading them into dataset folders[/]")
        dataset, val = prepare_datasets(Path(tmp), args.per_class, args.image_size)
        base = {
            "dataset": dataset, "val": val, "validate": args.validate, "image_size": args.image_size,
            "workers": args.workers, "backbone": args.backbone, "timm_name": timm_name(args.backbone),
            "feature_dim": args.feature_dim, "batch_size": args.batch_size, "epochs": args.epochs, "seed": 0,
            "device": args.device, "threads": args.threads,
        }
        for rep in range(args.repeats):
            for loop in ("ours", "bare") if rep % 2 == 0 else ("bare", "ours"):
                C.console.print(f"[cyan]run {rep + 1}/{args.repeats}: {loop}[/]")
                r = C.run_child(MODULE, {**base, "loop": loop, "output_dir": str(Path(tmp, f"run-{loop}-{rep}"))})
                epochs[loop].append(r["per_epoch"])

    measures = [("training", False)] + ([("training + validation", True)] if args.validate else [])
    columns = ["loop", "images/s of", "median images/s", "vs bare loop", "runs (steady-state images/s)"]
    rows, headlines = [], []
    for what, with_val in measures:
        runs = {loop: [steady_rate(r, with_val) for r in epochs[loop]] for loop in epochs}
        ours, bare = statistics.median(runs["ours"]), statistics.median(runs["bare"])
        spread = (max(runs["bare"]) - min(runs["bare"])) / bare if bare else 0.0
        rows += [["ours (trainer.engine.run_training = imlt train)", what, f"{ours:.0f}", C.ratio(ours, bare),
                  ", ".join(f"{v:.0f}" for v in runs["ours"])],
                 ["bare loop (timm + PML + DataLoader)", what, f"{bare:.0f}", "1.00x", ", ".join(f"{v:.0f}" for v in runs["bare"])]]
        # each repeat runs the two loops back to back, so their ratio cancels load that drifts between repeats
        paired = statistics.median(o / b for o, b in zip(runs["ours"], runs["bare"]))
        headlines.append(f"{what.capitalize()}: our trainer runs at {C.ratio(ours, bare)} the bare loop's images/s "
                         f"({ours:.0f} vs {bare:.0f}; run-to-run spread of the bare loop itself: {spread:.0%}); "
                         f"median of the per-repeat ratios: {paired:.2f}x.")
    C.print_table("Training throughput", columns, rows)
    validation = (f"validation on the 26 unseen classes ({26 * max(args.per_class // 2, 2)} images) after every epoch in both loops"
                  if args.validate else "no validation")
    body = (
        f"Work: {args.backbone} + Linear/BN neck to {args.feature_dim}-d, ArcFace (PML), SGD momentum + cosine, "
        f"{60 * args.per_class} generated glyph images ({args.image_size} px, 60 classes), batch {args.batch_size}, "
        f"{args.workers} DataLoader workers, {args.threads} torch threads, {validation}, {args.epochs} epochs per run, "
        f"first epoch not counted, {args.repeats} alternating runs of each loop, each in a fresh process.\n\n"
        + C.markdown_table(columns, rows)
    )
    name = "train_val" if args.validate else "train"
    title = "Training overhead" + (" with validation" if args.validate else "") + ": our trainer vs a bare loop"
    C.report(args, MODULE, name, title, headlines, body, info=info, started=started)


if __name__ == "__main__":
    main()
