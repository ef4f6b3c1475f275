"""The one data layer: every command and trainer reads its samples through here.

* ``jsonl``        the one JSON-lines reader (manifests, and run logs such as ``metrics.jsonl``)
* ``manifest``     manifest lines and image folders -> :class:`~unigen.data.manifest.Sample` (every format)
* ``bad_samples``  the run's list of skipped samples (``bad_samples.jsonl``) and the share that stops a run
* ``images``       image files checked at the door (regular file, header bounds, decode) and the tokenizers'
                   image dataset
* ``codes``        pre-extracted VQ codes (``"codes"`` on a manifest line), checked before training
* ``sampler``      seeded epoch batches, the held-out split

Import from the submodules (``from unigen.data.manifest import read_samples``): this file imports nothing, so
``unigen.runs`` can use the JSON-lines reader without an import cycle.
"""
