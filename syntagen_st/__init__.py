"""syntagen_st: synthetic VOC segmentation data from Stable Diffusion, refined by self-training."""

__version__ = "0.1.0"
