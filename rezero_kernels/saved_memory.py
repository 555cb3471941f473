"""How many bytes autograd keeps for backward: the activation memory a training step pays."""
from __future__ import annotations

import torch


def saved_bytes(fn, *args, exclude=()) -> int:
    """Run ``fn(*args)`` and count the bytes of the distinct storages autograd saved for its
    backward, leaving out storages of the tensors in ``exclude`` (e.g. the parameters, which are
    kept whether or not a layer saves them).  Views of one storage count once."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())
