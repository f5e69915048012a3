"""``torch.compile`` with a backend that records the graphs Dynamo hands it, for the tests that
check a reduced model compiles to one graph with no break."""

import torch


def counting_compile(model):
    """``(compiled, graphs)``: ``model`` compiled with ``fullgraph=True`` (Dynamo's caches reset
    first), and the list its FX graphs go into, each run as it is."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=backend), graphs
