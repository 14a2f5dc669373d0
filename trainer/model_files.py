"""The names of the files in a model folder, defined once.

A model folder is what the train step writes and every later step reads (evaluate, publish, a
model server); each published version holds the same files plus the exports and the card:

    model.safetensors   weights of the embedding model (backbone + neck)
    config.json         the resolved RunConfig with its hash
    classes.txt         one class name a line; a label id is a line index
    history.json        per-epoch training numbers
    training_curve.png  the same as a plot
    usage.json          billing-style usage of the run
    pretrained.json     where the starting weights came from and how they loaded (when there were any)
    last/               with a val split only: the last epoch's model folder (the top level holds the
                        best epoch by val Recall@1); the same files as a model folder
    model.ts, model.onnx, model_card.json, MODEL_CARD.md   (published versions)

Checkpoints are not in it: they live in their own folder (trainer.checkpoint), so the model
artifact that downstream steps download holds only the model.
"""

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CLASSES = "classes.txt"
HISTORY = "history.json"
CURVE = "training_curve.png"
USAGE = "usage.json"
PRETRAINED = "pretrained.json"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"

LAST = "last"

# What a model folder holds after training; the lean-artifact rule is that it holds nothing else.
TRAINED = (WEIGHTS, CONFIG, CLASSES, HISTORY, CURVE, USAGE)
