"""The application around the model: training, evaluation, prediction, checkpoints,
datasets, distributed set-up and the `maskrcnn` command. It may import every other
package of the project; nothing in the model, convert/ or deploy/ imports it.

    from engine import Predictor        # engine/predict.py: inference at work
"""


def __getattr__(name):
    # lazily: `import engine.cli` (the console script) should not load the model stack
    if name == "Predictor":
        from engine.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
