"""pagoda's evaluation suite. `from eval import evaluate` (eval.api) measures any samples in one call; the
submodules are its parts and command-line clients (eval.run, eval.fid, eval.ref, eval.gate)."""


def __getattr__(name: str):
    """`evaluate` and `Evaluator`, imported on first use (the torch-free modules, eval.gate and eval.rows, stay
    light to import)."""
    if name in ("evaluate", "Evaluator"):
        from eval import api
        return getattr(api, name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
