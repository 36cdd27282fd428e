"""What crosses the pipe to the model worker: plain pickles, with tensors by value.

torch's default for multiprocessing moves each tensor through its own shared-memory segment,
whose file descriptor the receiver fetches over a socket from a helper thread of the sender.
That thread needs the front end's GIL, so a busy event loop (say, answering a flood of 429s)
stalls the worker's every batch. Copying the bytes through the pipe costs a memcpy and never
waits on the other side."""

from __future__ import annotations

import io
import pickle

import torch


def _tensor(array, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype)) if dtype == "bfloat16" else tensor


class _ByValue(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: travel as raw 16-bit words
                return _tensor, (t.view(torch.int16).numpy(), "bfloat16")
            return _tensor, (t.numpy(), str(t.dtype).removeprefix("torch."))
        return NotImplemented


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _ByValue(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes):
    return pickle.loads(data)
