"""What the integrations share."""
import torch


def row_mask_target(labels, ignore_index=-100):
    """Labels used as a row mask only, as TRL and torchtune use them: -100 where ``labels`` is
    ``ignore_index``, 0 elsewhere (so that no other value of them, in range or not, matters)."""
    return torch.where(labels == ignore_index, -100, 0)
