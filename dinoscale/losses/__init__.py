"""Self-supervised losses, one per module, each a small ``nn.Module``; import them from their module.

``center`` holds the teacher targets that DINO's and iBOT's losses share (EMA centering, Sinkhorn-Knopp).
"""
