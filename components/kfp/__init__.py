"""KFP components: one thin adapter per step of trainer.steps, plus import_model.

Each is a Lightweight Python Component on the project image (no packages installed at run
time); see docs/kfp.md.
"""

from kfp import dsl

__all__ = ["evaluate", "import_model", "import_weights", "publish", "read_data", "train", "train_on_kubernetes", "validate"]

# Inside a running component kfp skips its compile-time modules, so dsl.component is missing
# there; the component bodies import only imlt.components.kfp._run and _artifacts, which need none of this.
if hasattr(dsl, "component"):
    from imlt.components.kfp.evaluate import evaluate
    from imlt.components.kfp.import_model import import_model
    from imlt.components.kfp.import_weights import import_weights
    from imlt.components.kfp.publish import publish
    from imlt.components.kfp.read_data import read_data
    from imlt.components.kfp.train import train
    from imlt.components.kfp.train_k8s import train_on_kubernetes
    from imlt.components.kfp.validate import validate
