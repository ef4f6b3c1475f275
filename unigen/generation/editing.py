"""Image editing: a source image read through the understanding path + an instruction -> a new image.

The prompt is a generation prompt whose user turn holds the source's placeholders and the instruction,
in the checkpoint's own format (system prompt empty, as Janus's generation prompts):

    BOS <|User|>: <begin_of_image> <image_placeholder> x N <end_of_image> \\n make it blue \\n\\n
        <|Assistant|>: <begin_of_image>

and the target's VQ codes follow. The source enters through SigLIP; a checkpoint with
``edit_source_codes`` also reads the source's VQ codes, in slots after that final <begin_of_image>
(their ids are ``tokens.pad``; the model embeds the codes there), so the target's codes directly follow
the source's and each can copy the one an image-length back. Every row, conditional or not, holds the
source's codes: they are the canvas, and guidance measures the instruction and the SigLIP read against it.
Classifier-free guidance has three unconditional rows to choose from, all the length of the
conditional one so the image tokens sit at the same positions; like Janus's, each keeps BOS and the final
<begin_of_image> and turns the dropped part into the CFG pad token:

- ``instruction``: the instruction (and the role words) dropped, the source image kept;
- ``image``: the source's block dropped, the instruction kept;
- ``both``: everything dropped (Janus's text-to-image unconditional row, at this length).

The trainer trains all three (a dropped edit sample takes one at random); the sampler uses one
(``DEFAULT_CFG_DROP``, chosen by measurement: docs/EXPERIMENTS.md). The rows are built by
``unigen.prompts.PromptBuilder.edit`` (``processor.prompts``), for the trainer and the pipeline alike; this module
names the edit vocabulary the commands and the app use.
"""

from unigen.prompts import CFG_DROPS, DEFAULT_CFG_DROP, check_drop, check_instruction, keeps_image, source_slots

__all__ = ["CFG_DROPS", "DEFAULT_CFG_DROP", "check_drop", "check_instruction", "keeps_image", "source_slots"]
