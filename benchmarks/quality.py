"""Retrieval quality on unseen classes: every loss x backbone, with raw-pixel and untrained baselines.

    python -m benchmarks.quality                # 20 glyphs a class, 8 epochs (about an hour on 2 cores)
    python -m benchmarks.quality --full         # the demo's sizes: 40 glyphs a class, 10 epochs
    python -m benchmarks.quality --all-pairs    # every loss on every backbone

Tasks (both open-set: the evaluated classes are never trained on):
- glyphs: trainer.data.synthetic.generate_glyphs, train on 60 characters, retrieve 26 others;
- digits: scikit-learn's 8x8 scans upscaled, train on digits 0-4, retrieve 5-9.
For each task, backbone, loss and seed the model is trained with trainer.engine.run_training
(the `imlt train` loop, product default margin/scale of each loss, AdamW at its product default
learning rate and weight decay + cosine unless --optimizer/--lr say otherwise) and the
unseen classes are embedded and scored leave-one-out (trainer.retrieval.retrieval_metrics).
Baselines in the same table: the input pixels themselves, and each backbone untrained (timm
with zero_init_last=False; with timm's default an untrained ResNet maps every image to nearly
the same point). Cells are mean +- standard deviation over the seeds (training seeds; the data
sets are fixed). A run whose loss turns NaN is reported as diverged, not hidden.

Every loss runs on the first backbone and the first loss on the other backbones (36 trainings
of 3 seeds at the defaults; `--all-pairs` for the full grid). Default sizes (half the demo's
glyphs, half the digit scans, 8 epochs) fit a 2-core machine in under an hour and are not
converged (the demo's 10 epochs of 2,400 glyphs reach R@1 ~0.8); `--full` uses the demo's sizes.
At the reference scales SGD at lr 0.1 (the reference default) trained no loss past the raw-pixel
baseline; at the class-count scale it trains from scratch (section quality_sgd). Without SGD's
default warm-up epoch LargeMarginSoftmax reached only 0.42 (section quality_sgd_warmup0, 4 of 5
losses); with it 0.52 and 5 of 5.

Why ArcFace and CosFace fall below raw pixels from scratch (glyphs, resnet18, 150 AdamW steps at
lr 2e-3, seed 0, R@1 on the unseen classes): the logit scale. The reference scales (30, 64) are
tuned for face recognition with tens of thousands of identities; on 60 classes they over-specialise
the features. A normalised softmax without margin at scale 64 fits the training classes (loss
7.7 -> 2.9) yet scores 0.05 on unseen classes; at AdaCos's fixed scale for 60 classes,
sqrt(2) ln 59 = 5.8, it scores 0.42, and a plain linear softmax head 0.49. At scale 5.8 with their
reference margins ArcFace reaches 0.42 (0.065 at 64) and AMSoftmax 0.45 (0.21 at 30). Ruled out:
BatchNorm statistics (0.058 evaluated with batch statistics), the neck (0.085 on the backbone's
own features), unit-norm class centres, centres at 10x the learning rate, warm-up, zero_init_last,
a higher learning rate, 512-d embeddings, a linear-softmax auxiliary head, scale and margin
ramped up over half the run (0.10-0.13). The class-count scale is therefore the product default;
`--reference-scale` trains at the reference scales and writes its own section.

SphereFace multiplies its logits by the feature norm, which our L2-normalised embeddings fix at 1, so
its reference scale 1 caps every logit at 1: R@1 0.33 with SGD, 0.51 at the class-count scale, which
it now gets by default. Feeding it (and LargeMarginSoftmax) the unnormalised neck output instead, as
their papers do, let the feature norm grow into a large scale: R@1 0.05 and 0.02 with AdamW.

Why AdamW trained every loss worse than SGD from scratch (R@1 0.26-0.35 at its default lr 1e-3): timm's
zero_init_last. It zeroes the last BatchNorm scale of each residual block, and AdamW moves a parameter by
about lr a step whatever its gradient, so 150 steps at lr 1e-3 left those scales at ~0.01 (SGD: 0.15-0.20):
the residual branches stayed shut and the network trained as a stem: LargeMarginSoftmax's training loss
fell 21 -> 17 where SGD's fell 21 -> 8. With the scales starting at 1 (seed 0, R@1): ArcFace 0.28 -> 0.61,
LargeMarginSoftmax 0.29 -> 0.64, AMSoftmax 0.35 -> 0.59, SphereFace 0.28 -> 0.49, CosFace 0.34 -> 0.57.
SGD, whose steps scale with the gradient, needs the zeroed start at lr 0.1: without it ArcFace fell to
0.32, SphereFace to 0.34, LargeMarginSoftmax to 0.11. model.zero_init_last therefore defaults to on for
SGD and off for AdamW; `--zero-init-last` forces it on and writes its own section.
Measured on the way with zero_init_last on, none of which lifted all five losses: lr 3e-3 (ArcFace 0.46),
warm-up, class centres at 10x / 100x the lr (0.36 / 0.40), weight decay 0.05, unit-norm centres, RAdam
(0.08-0.10), margin warm-up, LargeMarginSoftmax centres at the class-count norm.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

MODULE = "benchmarks.quality"
LOSSES = ("AMSoftmax", "ArcFace", "CosFace", "LargeMarginSoftmax", "SphereFace")
METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
HEAD = ("R@1", "R@2", "R@4", "R@8", "MAP@R")


def prepare(root: Path, task: str, per_class: int, image_size: int, digits_every: int) -> tuple[str, str]:
    """(train dataset_dir, val dataset_dir) of read_data folders."""
    from imlt.trainer.data.synthetic import generate_digits, generate_glyphs
    from imlt.trainer.steps import ReadDataInput, read_data

    if task == "glyphs":
        data = generate_glyphs(root / task, train_per_class=per_class, val_per_class=glyph_val(per_class), image_size=image_size)
    else:
        data = generate_digits(root / task, image_size=image_size)
        if digits_every > 1:  # keep every n-th train scan (the unseen val digits stay complete)
            ann = Path(data.train_annotations)
            ann.write_text("".join(ann.read_text().splitlines(keepends=True)[::digits_every]))
    train = read_data(ReadDataInput(output_dir=str(root / f"{task}-train"), annotations=data.train_annotations,
                                    class_names=data.train_classes))
    val = read_data(ReadDataInput(output_dir=str(root / f"{task}-val"), annotations=data.val_annotations,
                                  class_names=data.val_classes, split="val"))
    return train.dataset_dir, val.dataset_dir


def glyph_val(per_class: int) -> int:
    return max(per_class // 2, 5)


def train_and_score(spec: dict[str, Any]) -> dict[str, float] | None:
    """Train one model and score the unseen classes; None if the loss diverged."""
    from imlt.trainer.config import validate_config
    from imlt.trainer.data.manifest import read_manifest
    from imlt.trainer.engine import NonFiniteLossError, run_training
    from imlt.trainer.evaluate import embed
    from imlt.trainer.model import load_embedding_model
    from imlt.trainer.retrieval import retrieval_metrics
    from imlt.trainer.steps import TrainInput

    cfg = validate_config({
        "output_dir": spec["output_dir"],
        "data": {"image_size": spec["image_size"], "reader_threads": spec["workers"]},
        "model": {"backbone": spec["backbone"], "feature_dim": spec["feature_dim"], "zero_init_last": spec["zero_init_last"]},
        "loss": {"name": spec["loss"], **({"auto_scale": False} if spec["reference_scale"] else {})},
        "optim": {"optimizer": spec["optimizer"], "lr": spec["lr"], "weight_decay": spec["weight_decay"],
                  "warmup_epochs": spec["warmup_epochs"], "scheduler": "cosine"},
        "train": {"batch_size": spec["batch_size"], "epochs": spec["epochs"], "checkpoint_every": spec["epochs"],
                  "seed": spec["seed"], "device": spec["device"]},
    })
    try:
        out = run_training(TrainInput(config=cfg, train_dataset=spec["train"], resume=False))
    except NonFiniteLossError as e:
        C.console.print(f"[yellow]diverged: {e}[/]")
        return None
    model, _ = load_embedding_model(out.model_dir)
    emb, labels = embed(model, read_manifest(spec["val"]), spec["image_size"], 256, 0, spec["device"])
    return retrieval_metrics(emb, labels)


def untrained_score(val: str, backbone: str, feature_dim: int, image_size: int, seed: int, device: str) -> dict[str, float]:
    import torch

    from imlt.trainer.config import ModelConfig
    from imlt.trainer.data.manifest import read_manifest
    from imlt.trainer.evaluate import embed
    from imlt.trainer.model import build_model
    from imlt.trainer.retrieval import retrieval_metrics

    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone=backbone, feature_dim=feature_dim, zero_init_last=False), image_size)
    emb, labels = embed(model, read_manifest(val), image_size, 256, 0, device)
    return retrieval_metrics(emb, labels)


def pixel_score(val: str, image_size: int) -> dict[str, float]:
    from imlt.trainer.data.manifest import read_manifest
    from imlt.trainer.evaluate import raw_pixel_embeddings
    from imlt.trainer.retrieval import retrieval_metrics

    return retrieval_metrics(*raw_pixel_embeddings(read_manifest(val), image_size))


def cell(values: list[float]) -> str:
    if not values:
        return "diverged"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="Demo sizes: 40 glyphs a class, all digits, 10 epochs (~40x longer)")
    p.add_argument("--tasks", nargs="+", default=["glyphs", "digits"], choices=["glyphs", "digits"])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet10t"])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--all-pairs", action="store_true",
                   help="Every loss on every backbone (default: every loss on the first backbone, the first loss on the rest)")
    p.add_argument("--per-class", type=int, default=20, help="Glyph train images per class")
    p.add_argument("--digits-every", type=int, default=2, help="Train on every n-th digit scan (1: all 900)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared box oversubscribed OpenMP threads slow torch 3-5x")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--optimizer", default="AdamW", choices=["AdamW", "SGD"])
    p.add_argument("--lr", type=float, default=None, help="Peak learning rate (default: the optimiser's product default)")
    p.add_argument("--weight-decay", type=float, default=None, help="Weight decay (default: the optimiser's product default)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="Epochs of linear warm-up (default: the optimiser's product default)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers while training")
    p.add_argument("--reference-scale", action="store_true",
                   help="Train at the reference component's logit scales (loss.auto_scale=false: AMSoftmax 30, ArcFace and "
                        "CosFace 64) instead of the product default, the class-count scale")
    p.add_argument("--zero-init-last", action="store_true",
                   help="Zero the last BatchNorm of each residual block at init (timm's default) whatever the optimiser (product "
                        "default: with SGD only)")
    args = p.parse_args()
    from imlt.trainer.config import OptimConfig

    warmup_is_default = args.warmup_epochs is None
    optim = OptimConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_epochs=args.warmup_epochs)  # the product's per-optimiser defaults fill the gaps
    args.lr, args.weight_decay, args.warmup_epochs = optim.lr, optim.weight_decay, optim.warmup_epochs
    if args.full:
        args.per_class, args.epochs, args.digits_every = 40, 10, 1
    if args.quick:
        args.tasks, args.backbones, args.losses, args.seeds, args.per_class, args.epochs = ["glyphs"], ["resnet18"], ["ArcFace"], 1, 6, 1
    logging.getLogger("imlt.trainer").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    info = C.machine_info(args.device)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    diverged: dict[tuple[str, str], int] = {}
    seeds = list(range(args.seeds))
    pairs = [(b, loss) for i, b in enumerate(args.backbones) for loss in args.losses
             if args.all_pairs or i == 0 or loss == args.losses[0]]
    total = len(args.tasks) * len(pairs) * len(seeds)
    done = 0
    with tempfile.TemporaryDirectory(prefix="imlt-bench-quality-") as tmp:
        for task in args.tasks:
            train, val = prepare(Path(tmp), task, args.per_class, args.image_size, args.digits_every)
            results[(task, "raw pixels")] = [pixel_score(val, args.image_size)]
            for backbone in args.backbones:
                results[(task, f"{backbone}, untrained")] = [
                    untrained_score(val, backbone, args.feature_dim, args.image_size, s, args.device) for s in seeds
                ]
            for backbone, loss in pairs:
                key = (task, f"{backbone} + {loss}")
                results[key], diverged[key] = [], 0
                for seed in seeds:
                    done += 1
                    C.console.print(f"[cyan][{done}/{total}] {task}: {backbone} + {loss}, seed {seed}[/] "
                                    f"({time.monotonic() - started:.0f} s)")
                    spec = {
                        "train": train, "val": val, "backbone": backbone, "loss": loss, "seed": seed,
                        "output_dir": str(Path(tmp, "runs", task, backbone, loss, str(seed))),
                        "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
                        "feature_dim": args.feature_dim, "optimizer": args.optimizer, "lr": args.lr,
                        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
                        "workers": args.workers, "device": args.device,
                        "reference_scale": args.reference_scale, "zero_init_last": True if args.zero_init_last else None,
                    }
                    m = train_and_score(spec)
                    if m is None:
                        diverged[key] += 1
                    else:
                        results[key].append(m)
    columns = ["task", "embedding", *HEAD, "runs"]
    rows = []
    for (task, name), runs in results.items():
        bad = diverged.get((task, name), 0)
        rows.append([task, name, *(cell([r[k] for r in runs]) for k in METRICS),
                     f"{len(runs)}" + (f" (+{bad} diverged)" if bad else "")])
    C.print_table("Open-set retrieval on unseen classes (mean ± std over seeds)", columns, rows)
    headlines = []
    for task in args.tasks:
        pix = results[(task, "raw pixels")][0]["recall_at_1"]
        trained = {name: statistics.mean(r["recall_at_1"] for r in runs)
                   for (t, name), runs in results.items() if t == task and "+" in name and runs}
        if trained:
            best = max(trained, key=trained.get)  # type: ignore[arg-type]
            untrained = max(statistics.mean(r["recall_at_1"] for r in runs)
                            for (t, name), runs in results.items() if t == task and name.endswith("untrained"))
            headlines.append(f"{task}: best trained ({best}) R@1 {trained[best]:.3f} = {C.ratio(trained[best], pix)} "
                             f"raw pixels ({pix:.3f}) and {C.ratio(trained[best], untrained)} the best untrained network "
                             f"({untrained:.3f}).")
            short = sorted(name for name, r1 in trained.items() if r1 < pix + 0.2)
            headlines.append(f"{task}: R@1 >= raw pixels + 0.2 ({pix + 0.2:.3f}) reached by {len(trained) - len(short)} of "
                             f"{len(trained)} trained models" + (f"; not by {', '.join(short)}." if short else "."))
    body = (
        f"Sizes ({'full' if args.full else 'default, not converged'}): {args.image_size} px, glyphs "
        f"{args.per_class} train / {glyph_val(args.per_class)} val images a class (60 train classes, 26 unseen), digits 0-4 "
        f"train (every {args.digits_every}. scan), 5-9 unseen (all ~900); {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr} weight decay {args.weight_decay} warm-up {args.warmup_epochs} epoch(s) then cosine, "
        f"{args.threads} torch thread(s), "
        f"{args.feature_dim}-d embeddings, product default margin per loss, "
        + ("the reference component's scale per loss" if args.reference_scale else
           "product default scale per loss (the class-count scale sqrt(2) ln 59 = 5.77 on glyphs for the fixed-scale losses)")
        + (", last BatchNorm of each residual block zeroed at init" if args.zero_init_last else "")
        + f"; {args.seeds} training seeds "
        "(raw pixels have no seed).\n\n"
        + C.markdown_table(columns, rows)
    )
    # one section per recipe: runs of different recipes (e.g. side by side on two cores) keep each other's results
    variant = "".join(f"_{v}" for v in (args.optimizer.lower() if args.optimizer != "AdamW" else "",
                                        "reference_scale" if args.reference_scale else "",
                                        "zero_init_last" if args.zero_init_last else "",
                                        "" if warmup_is_default else f"warmup{args.warmup_epochs}") if v)
    title = "Quality: Recall@K and MAP@R on unseen classes" + (f" ({variant[1:].replace('_', ' ')})" if variant else "")
    C.report(args, MODULE, "quality" + variant, title, headlines, body, info=info, started=started)


if __name__ == "__main__":
    main()
