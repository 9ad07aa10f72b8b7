"""Checkpoints: the one DCP layout (model-only and training) and safetensors/HF I/O.

One file each:

* ``model_checkpoint.py``: a model's weights as one sharded DCP checkpoint, keyed by the
  plain state-dict names, loadable under any layout;
* ``training.py``: training checkpoints (model, optimizer, LR scheduler, data cursor, RNG
  states, step) written atomically (or in the background), verified, pruned, resumed; it
  alone knows their layout;
* ``manifest.py``: integrity: every file's size and CRC-32, written last, checked before
  a checkpoint is used;
* ``lineage.py``: runs and branches of a checkpoint folder: what a start resumes, forks,
  refuses or moves aside, and which checkpoints a save may prune;
* ``disk_space.py``: checkpoint size estimates, free space, "no space left" errors;
* ``hf_export.py``: an HF folder from a training checkpoint, streamed by one rank;
* ``safetensors_io.py``: model-agnostic safetensors folders (HF ``save_pretrained``'s).
"""

from d9d.checkpoint.model_checkpoint import load_model_checkpoint, save_model_checkpoint

__all__ = ["load_model_checkpoint", "save_model_checkpoint"]
