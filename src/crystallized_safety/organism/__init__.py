"""Model organisms: refusal-tuned models built on CPU, deterministic for a seed, cached with a model card.

`recipe` (what changes the weights), `training` (examples, the packed loss, the loop), `card` (measuring and
the model card), `build` (cache, lock, atomic write).
"""
