"""cape-ray: category-agnostic pose estimation trained as a fault-tolerant Ray Train job."""

__version__ = "0.1.0"
