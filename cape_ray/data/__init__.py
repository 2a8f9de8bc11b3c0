"""Data layer: datasets (synthetic, MP-100), cropping/augmentation, episodes and batching."""
