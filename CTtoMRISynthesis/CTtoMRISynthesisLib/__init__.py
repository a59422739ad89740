"""CT→MRI synthesis: the science behind the CTtoMRISynthesis Slicer module.

Plain Python (SimpleITK, NumPy, PyTorch). Nothing here imports Qt or the Slicer application;
only ``mrml.py`` imports ``slicer`` (MRML classes), and only when it is used.
"""

__version__ = "0.1.0"
