"""Classification fine-tuning and linear probing of SwinV2 backbones: the second task of the trainer (issue 12).

``python -m pretrain.finetune --config configs/finetune_swinv2_base_224_w14.yaml finetune.init=RUN_DIR``.

Modules: :mod:`.config` (the ``finetune``, ``augment`` and labelled ``data`` sections), :mod:`.weights` (pretrained
weights from any source, loaded strictly), :mod:`.model` (classifier and linear probe), :mod:`.transforms` (timm's
transforms, Mixup, losses), :mod:`.evaluation` (top-1/top-5 gathered over ranks), :mod:`.ema`, :mod:`.task` (the
trainer task) and :mod:`.eval_only` (``--eval-only``).
"""

from .config import FinetuneConfig, load_finetune_config
from .task import FinetuneTask

__all__ = ["FinetuneConfig", "FinetuneTask", "load_finetune_config"]
