"""On-disk formats: the HDF5 model files (``hdf5`` gathers their public names; ``layout`` names every
HDF5 path), the original's raw float32 files (``raw``), MNIST IDX files (``idx``), and the one
atomic-write helper every whole-file writer uses (``atomic``). Nothing here imports nn/ or training/."""
