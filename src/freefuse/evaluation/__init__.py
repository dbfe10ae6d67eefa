"""`freefuse eval pairs`: the paper's evaluation (Sec. 5.1, Table 2) on the user's own LoRAs.

Character LoRAs two by two, interaction prompts with `<A>` and `<B>`, the same seeds for every
method; images made by the batch runner (resumable, accelerate for many GPUs), scored by metric
plug-ins loaded only when asked (`metrics`), summarised as the average and the best of the seeds
per prompt ("10-Pass", `summary`), and reported (`report`). `run` puts the parts together.

Modules, top to bottom: `run` (the whole evaluation), `jobs` (the generation plan on top of the
batch runner, and the plain diffusers baseline), `scoring` and `report`, then `metrics`, `crops`
and `summary`, then `judge` and `prompts`. Nothing here is imported by the rest of FreeFuse.
"""
