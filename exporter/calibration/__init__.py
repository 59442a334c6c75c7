"""Calibration: what the weight pass needs from running data through the model (activation amax).

data.py      token batches: `random` (no tokenizer), a .jsonl/.txt file, or a Hub dataset
model.py     loading the transformers model / tokenizer, and how to feed the model
session.py   one model per job, loaded at most once, shared by `auto` scoring and calibration
targets.py   which modules are observed, bound to where they live in the runtime model
experts.py   per-expert input statistics for fused 3-D experts
forward.py   calibrate(source, plan, ...) / calibrate_model(model, ...): the instrumented forward pass
stats.py     ActivationStats (saved as calibration.json), the only thing handed to the weight pass

Submodules are imported by name (`quantgate.exporter.calibration.stats`); this package imports
nothing itself, so reading the stats file never pays for the forward machinery.
"""
