"""ShapesWorld: a small offline world of coloured, textured shapes where bleeding can be counted.

`scenes` draws pictures and captions, `detect` reads every object back, `model` loads the
committed FLUX-architecture model and its subject LoRAs, `evaluate` measures merge, FreeFuse and
ground-truth masks there. `train` (the training code) is for `scripts/train_shapesworld.py` only:
product code never imports it.
"""
