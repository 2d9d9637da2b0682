"""mri-edge: train, export, verify and benchmark brain-MRI classifiers for edge devices.

Nothing heavy is imported here: `mri_edge.runtime` must stay importable on a
device that has only numpy and a TFLite interpreter.
"""

__version__ = "0.1.0"
