"""Memory measures only the lab reports (nanoebm/memory.py keeps what the pre-step check needs)."""
import torch


def state_bytes(model, opt) -> int:
    """Parameters, their gradients and the optimizer's state (AdamW: two moments)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    st = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
             if torch.is_tensor(t))
    return 2 * n + st
