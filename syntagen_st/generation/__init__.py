"""Generation: Stable Diffusion under attention capture, attention -> labels, the pool writer."""
