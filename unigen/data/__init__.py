"""The one data layer: every command and trainer reads its samples through here.

* ``jsonl``        the one JSON-lines reader (manifests, and run logs such as ``metrics.jsonl``)
* ``manifest``     manifest lines and image folders -> :class:`~unigen.data.manifest.Sample` (every format)
* ``bad_samples``  the run's list of skipped samples (``bad_samples.jsonl``) and the share that stops a run
* ``images``       image files (and image bytes) checked at the door: regular file, header bounds, decode
* ``codes``        pre-extracted VQ codes (``"codes"`` on a manifest line), loaded safely and checked
* ``checks``       every file a sample names, checked before training (images, codes; codes against the VQ)
* ``image_dataset`` the image trainers' (VQ, SigLIP) decoded dataset
* ``sampler``      the image trainers' seeded epoch batches, the held-out split
* ``shards``       WebDataset tar and ``datasets`` parquet/arrow shards, read lazily
* ``stream``       streamed shards split across processes, resumable mid-epoch (``state_dict``)

Import from the submodules (``from unigen.data.manifest import read_samples``): this file imports nothing, so
``unigen.runs`` can use the JSON-lines reader without an import cycle.
"""
