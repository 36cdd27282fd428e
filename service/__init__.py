"""The AToken inference service: media layer, batching worker and HTTP API."""

from . import allocator

# Every process that serves or runs the model imports this package first: the front end,
# its worker, Ray's tasks and actors, Triton's model. Before the first large allocation.
allocator.settle()
