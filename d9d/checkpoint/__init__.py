"""Checkpoints: the one DCP layout (model-only and training) and safetensors/HF I/O.

One file each:

* ``model_checkpoint.py``: a model's weights as one sharded DCP checkpoint, keyed by the
  plain state-dict names, loadable under any layout;
* ``training.py``: training checkpoints (model, optimizer, LR scheduler, data cursor, RNG
  states, step) written atomically, pruned, resumed; it alone knows their layout;
* ``hf_export.py``: an HF folder from a training checkpoint;
* ``safetensors_io.py``: model-agnostic safetensors folders (HF ``save_pretrained``'s).
"""

from d9d.checkpoint.model_checkpoint import load_model_checkpoint, save_model_checkpoint

__all__ = ["load_model_checkpoint", "save_model_checkpoint"]
