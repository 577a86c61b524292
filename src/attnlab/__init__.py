"""attnlab: a Hydra + Lightning lab for comparing attention mechanisms in GPT-style language models.

A regular package (not a namespace one), so that an ``attnlab/`` folder in the working directory,
such as a checkout, is never merged into it.
"""
