"""Contrastive losses: SupCon (public API first), GenSCL and the queue loss.

Modules:
  supcon.py   `supcon_loss` / `SupConLoss`: validation, layout, the public API.
  kernel.py   the fast kernel: masks, custom-gradient logits ops, chunked blocks.
  layout.py   helpers every loss shares: flatten views, labels, anchors /
              contrast set, label similarity, extra (queue) samples.
  genscl.py   `genscl_loss` / `GenSCLLoss` (Kim et al., 2022).
  queue.py    `supcon_loss_with_queue`: SupCon with momentum-queue keys.
"""

from supcon_tf.losses.genscl import GenSCLLoss
from supcon_tf.losses.genscl import genscl_loss
from supcon_tf.losses.queue import supcon_loss_with_queue
from supcon_tf.losses.supcon import SupConLoss
from supcon_tf.losses.supcon import supcon_loss

__all__ = ['supcon_loss', 'SupConLoss', 'genscl_loss', 'GenSCLLoss',
           'supcon_loss_with_queue']
